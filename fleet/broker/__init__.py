"""The MQTT broker's accounts: per-device credentials and the configuration the fleet expects.

``acl`` says which topics each kind of account may use, ``accounts`` is the interface the
fleet's services call, ``dynsec`` drives Mosquitto's dynamic-security plugin over MQTT, and
``config_files`` writes a broker configuration (``palaute broker-config``).
"""
