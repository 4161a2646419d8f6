"""`tufa`, the admin CLI: one module per command group, as in fioctl."""
