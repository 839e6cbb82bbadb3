// The console's only script (served from /console/static: the CSP allows no other).
// It refreshes the pending approvals, keeps the reasons being typed, counts the time
// left, and reloads the charts. Everything it inserts is HTML the server escaped.
"use strict";

function countdown() {
  const now = Date.now() / 1000;
  for (const el of document.querySelectorAll(".left[data-expires]")) {
    const left = Math.max(0, Math.round(Number(el.dataset.expires) - now));
    el.textContent = left > 0 ? left + " s left" : "expired";
  }
}

async function refreshApprovals(live) {
  let response;
  try {
    response = await fetch(live.dataset.src, { credentials: "same-origin", cache: "no-store" });
  } catch (e) {
    return;  // the service is away for a moment: try again at the next tick
  }
  if (response.status === 401) {
    window.location.assign("/console/signin?ended=expired");
    return;
  }
  if (!response.ok) return;
  const html = await response.text();
  const doc = new DOMParser().parseFromString(html, "text/html");
  const fresh = doc.getElementById("approvals");
  const current = document.getElementById("approvals");
  if (!fresh || !current || fresh.dataset.signature === current.dataset.signature) return;
  const typed = {};
  for (const input of current.querySelectorAll("input.reason")) typed[input.dataset.for] = input.value;
  current.replaceWith(document.adoptNode(fresh));
  for (const input of fresh.querySelectorAll("input.reason")) {
    if (typed[input.dataset.for]) input.value = typed[input.dataset.for];
  }
  countdown();
}

document.addEventListener("DOMContentLoaded", () => {
  const live = document.getElementById("live");
  if (live) setInterval(() => refreshApprovals(live), 2000);
  if (document.querySelector(".left[data-expires]") || live) setInterval(countdown, 1000);
  const charts = document.querySelectorAll("img.chart");
  if (charts.length) {
    setInterval(() => {
      for (const img of charts) img.src = img.src.split("?")[0] + "?t=" + Date.now();
    }, 10000);
  }
});
