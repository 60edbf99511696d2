"""`python -m podtwin.runner`: the podtwin CLI."""
try:
    from podtwin.runner.cli import run
except KeyboardInterrupt:  # Ctrl-C while still importing: nothing was created yet
    import sys
    print("podtwin: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

run()
