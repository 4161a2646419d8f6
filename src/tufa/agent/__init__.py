"""tufa-agent: the update agent that runs on each device.

It imports only the core dependency set (python-tuf, securesystemslib, cryptography,
httpx, click, rich) and nothing of the server, so a device installs a lean package and
the agent starts fast.
"""
