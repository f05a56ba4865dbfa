"""The command line: one module per `pursamere-fast` subcommand. Nothing in the library imports it."""
