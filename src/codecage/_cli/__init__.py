"""The `codecage` command (console script `codecage = "codecage._cli:main"`; also
`python -m codecage`). A client of the SDK and the service; nothing else imports it.

    main.py      the parser and one `cmd_*` per subcommand; `main` (exit 2 on SandboxError)
    shell.py     `codecage shell`: the interactive session (multi-line cells, images saved)
    doctor.py    `codecage doctor`: which protections this host supports, one check a line
    prompt.py    the approval prompt at /dev/tty (`run` and `shell` answer approvals with it)
    terminal.py  the one filter for sandbox text on its way to a terminal (`clean`)
"""

from .main import main

__all__ = ["main"]
