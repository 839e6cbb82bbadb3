"""Code that runs in the template and inside the jail: standard library only."""
