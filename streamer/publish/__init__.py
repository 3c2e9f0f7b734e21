"""Publishers: where calibrated surfaces and Greeks go (MQTT, JSON Lines, memory).

``base`` is the plug point and the encoding, ``urls.from_url`` picks a publisher from a URL,
``payloads`` builds the DESIGN section 4 topics and payloads.
"""
