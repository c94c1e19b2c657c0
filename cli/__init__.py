"""The cytostore command line (typer). Parses options, calls the library, prints."""
