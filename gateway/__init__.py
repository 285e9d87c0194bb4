"""Composition root: the command line and the apps that wire the services together."""
