"""The command line: `cnn-pipeline <command>` (cli.py), what each command runs (commands.py)."""
