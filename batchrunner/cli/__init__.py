"""The command line: click commands, progress on stderr, what a crash leaves."""
