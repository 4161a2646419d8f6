"""The demo and its test harness: `tufa demo` (story.py), the impostor update server of
its chapter 10 (impostor.py), and the loopback `tufa-server` it starts (local_server.py).

The test suite and the benchmarks use the impostor and the local server too. This package
drives tufa-server, tufa and tufa-agent only as processes and over HTTP, so it imports
core alone; cli/main.py imports it to register `tufa demo`, and nothing else in src does.
"""
