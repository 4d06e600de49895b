"""`edgellm` on the command line: arguments, commands, console output and the demo. Thin: parse,
call the Python API or the service, print."""
