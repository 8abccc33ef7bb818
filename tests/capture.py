"""The seed capture's voice gateway messages (``/work/shared/seed/``, "Voice Gateway"), verbatim.

Discord's browser client (Firefox 99) joining a voice channel over gateway v6 with the ``webrtc``
transport, as a proxy recorded it in April 2022: one JSON text per message, in the order they
crossed the wire. Only the identify token was redacted in the capture (``<token>``).
"""

# ruff: noqa: E501 - the messages are kept verbatim, one line each, as the capture shows them

from __future__ import annotations

import json
from typing import Any, Final

SERVER_ID: Final = "934828556603764816"
USER_ID: Final = "959467381011415120"
SESSION_ID: Final = "bc2bdbdaebf0d131ae580b79e01197ab"

#: From the server.
HELLO: Final = '{"op":8,"d":{"v":6,"heartbeat_interval":13750}}'
#: From the client.
IDENTIFY: Final = '{"op":0,"d":{"server_id":"934828556603764816","user_id":"959467381011415120","session_id":"bc2bdbdaebf0d131ae580b79e01197ab","token":"<token>","video":true,"streams":[{"type":"video","rid":"100","quality":100}]}}'
#: From the server.
READY: Final = '{"op":2,"d":{"streams":[{"type":"video","ssrc":713746,"rtx_ssrc":713747,"rid":"100","quality":100,"active":false}],"ssrc":713745,"port":50001,"modes":["aead_aes256_gcm_rtpsize","aead_aes256_gcm","xsalsa20_poly1305_lite_rtpsize","xsalsa20_poly1305_lite","xsalsa20_poly1305_suffix","xsalsa20_poly1305"],"ip":"213.163.95.84","experiments":["bwe_conservative_link_estimate","bwe_remote_locus_client","fixed_keyframe_interval"]}}'
#: From the client.
BACKEND_VERSION_REQUEST: Final = '{"op":16,"d":{}}'
#: From the server.
BACKEND_VERSION: Final = '{"op":16,"d":{"voice":"0.8.34","rtc_worker":"0.3.19"}}'
#: From the client.
STREAMS: Final = '{"op":12,"d":{"audio_ssrc":0,"video_ssrc":0,"rtx_ssrc":0,"streams":[{"type":"video","rid":"100","ssrc":0,"active":false,"quality":100,"rtx_ssrc":0,"max_bitrate":2500000,"max_framerate":20,"max_resolution":{"type":"fixed","width":1280,"height":720}}]}}'
#: From the client.
SELECT_PROTOCOL: Final = '{"op":1,"d":{"protocol":"webrtc","data":"a=ice-options:trickle\\na=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level\\na=extmap:2/recvonly urn:ietf:params:rtp-hdrext:csrc-audio-level\\na=extmap:3 urn:ietf:params:rtp-hdrext:sdes:mid\\na=ice-pwd:9473594540563294f62301e5dc183472\\na=ice-ufrag:925273d0\\na=rtpmap:109 opus/48000/2\\na=extmap:4 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time\\na=extmap:5 urn:ietf:params:rtp-hdrext:toffset\\na=extmap:6/recvonly http://www.webrtc.org/experiments/rtp-hdrext/playout-delay\\na=extmap:7 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01\\na=rtpmap:120 VP8/90000\\na=rtpmap:124 rtx/90000","sdp":"a=ice-options:trickle\\na=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level\\na=extmap:2/recvonly urn:ietf:params:rtp-hdrext:csrc-audio-level\\na=extmap:3 urn:ietf:params:rtp-hdrext:sdes:mid\\na=ice-pwd:9473594540563294f62301e5dc183472\\na=ice-ufrag:925273d0\\na=rtpmap:109 opus/48000/2\\na=extmap:4 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time\\na=extmap:5 urn:ietf:params:rtp-hdrext:toffset\\na=extmap:6/recvonly http://www.webrtc.org/experiments/rtp-hdrext/playout-delay\\na=extmap:7 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01\\na=rtpmap:120 VP8/90000\\na=rtpmap:124 rtx/90000","codecs":[{"name":"opus","type":"audio","priority":1000,"payload_type":109,"rtx_payload_type":null},{"name":"H264","type":"video","priority":1000,"payload_type":126,"rtx_payload_type":127},{"name":"VP8","type":"video","priority":2000,"payload_type":120,"rtx_payload_type":124},{"name":"VP9","type":"video","priority":3000,"payload_type":121,"rtx_payload_type":125}],"rtc_connection_id":"e621fc80-9998-4ace-b100-34383822e063"}}'
#: From the server.
MEDIA_SINK_WANTS: Final = '{"op":15,"d":{"any":100}}'
#: From the server.
SESSION_DESCRIPTION: Final = '{"op":4,"d":{"video_codec":"H264","sdp":"m=audio 50001 ICE/SDP\\na=fingerprint:sha-256 4A:79:94:16:44:3F:BD:05:41:5A:C7:20:F3:12:54:70:00:73:5D:33:00:2D:2C:80:9B:39:E1:9F:2D:A7:49:87\\nc=IN IP4 213.163.95.84\\na=rtcp:50001\\na=ice-ufrag:tK/L\\na=ice-pwd:g40S9IK0OQ8GOTCorkDZDR\\na=fingerprint:sha-256 4A:79:94:16:44:3F:BD:05:41:5A:C7:20:F3:12:54:70:00:73:5D:33:00:2D:2C:80:9B:39:E1:9F:2D:A7:49:87\\na=candidate:1 1 UDP 4261412862 213.163.95.84 50001 typ host\\n","media_session_id":"8e60b8396805ee8d0985a0c57ef59461","audio_codec":"opus"}}'
#: From the client.
HEARTBEAT: Final = '{"op":3,"d":1650483735947}'
#: From the server.
HEARTBEAT_ACK: Final = '{"op":6,"d":1650483735947}'
#: From the client.
SPEAKING_ON: Final = '{"op":5,"d":{"speaking":1,"delay":5,"ssrc":1331704490}}'
#: From the client.
SPEAKING_OFF: Final = '{"op":5,"d":{"speaking":0,"delay":5,"ssrc":1331704490}}'

#: The server's messages in the order Discord sent them (op6 answers the op3 before it).
SERVER_ORDER: Final = (
    HELLO,
    READY,
    BACKEND_VERSION,
    MEDIA_SINK_WANTS,
    SESSION_DESCRIPTION,
    HEARTBEAT_ACK,
)
#: The client's messages in the order the browser sent them.
CLIENT_ORDER: Final = (
    IDENTIFY,
    BACKEND_VERSION_REQUEST,
    STREAMS,
    SELECT_PROTOCOL,
    HEARTBEAT,
    SPEAKING_ON,
    SPEAKING_OFF,
)


def d(message: str) -> Any:
    """The ``d`` of one of the messages above, parsed."""
    return json.loads(message)["d"]
