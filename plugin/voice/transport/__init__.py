"""Media transports: plain UDP/RTP and WebRTC (aiortc)."""
