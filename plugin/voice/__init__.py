"""The voice client: sans-I/O gateway core, RTP, crypto, transports and the VoiceProtocol shell."""
