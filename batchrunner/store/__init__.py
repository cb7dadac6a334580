"""What is kept on disk: the checkpoint, resume, the output and its formats."""
