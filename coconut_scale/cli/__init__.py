"""The command line: `coconut-scale <subcommand>` (cli/main.py) and one module per subcommand."""
