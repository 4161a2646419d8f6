"""What the server, the admin CLI and the device agent share: keys, TUF metadata, archives.

Nothing in here may import the server's web framework or database layer: the device
agent installs only this package's core dependencies.
"""
