"""The telephone (IVR) channel: card recharges and balance inquiries by keypad.

`dialog` (the table and the pure state machine), `prompts` and `speech` (what is said, in
Chinese and English), `store` (call state in Redis), `service` (the I/O shell), `api` (HTTP),
`install` (wiring), `simulator` (an IVR server for tests, the demo and the benchmark).
"""
