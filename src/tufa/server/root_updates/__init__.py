"""Root updates as transactions: init, stage edits, collect signatures, apply or cancel.

The owner's offline keys never reach the server: the CLI edits the staged roots and
signs them locally. The server checks each step against the rules in
`tufa.core.root_update` and its own (`checks.py`), and applies an update atomically:
both roots, the owner's root key pairs, re-signed production targets, promoted online
keys, and fresh CI targets, snapshots and timestamps change in one transaction, or
nothing does (`Repository.publish_roots`).

- `transaction.py`: the steps (`RootUpdates`), each in its caller's transaction.
- `staged.py`: the open update as stored, one per factory.
- `checks.py`: what the server refuses in staged content and in signatures.
- `status.py`: the open update as the API shows it.

A factory created before the channels were separated (ADR 0009) has online keys both
channels share. Its next update gives them keys of their own: `init` stages new online
keys for CI (targets, snapshot, timestamp) and for production (snapshot, timestamp;
production keeps its online targets key, so its offline-signed targets stay valid).
The owner's edits must also give each channel its own half of every root key, which
`rotate-root` does.
"""
