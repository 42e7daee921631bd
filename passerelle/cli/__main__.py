from passerelle.cli import entry

entry()
