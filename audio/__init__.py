"""The in-process audio pipeline: resolve, decode, encode, queue and pace 20 ms Opus frames."""
