"""Sans-I/O cryptography of gridpay: AES-CMAC and check values, the LMK, TR-31 version D key
blocks, ISO 9564 PIN blocks and recharge-card voucher tags. No sockets, no asyncio."""
