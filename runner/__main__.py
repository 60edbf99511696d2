from podtwin.runner.cli import run

run()
