"""Many machines: Kamailio spreads inbound calls over nodes, a Redis stream hands out API-started calls.

``runner`` the interface a node offers the cluster layer · ``front`` the node's SIP front (OPTIONS 200/503,
INVITE proxied to the call's user agent) · ``streams`` the Redis keys and atomic steps · ``agent`` a node's
cluster member (read while free, refresh, reap, reconnect) · ``kamailio`` renders deploy/kamailio ·
``holdcall``/``holdnode`` hold calls (SIP + RTP, no browser) and a node made of them · ``cli`` the
``sipbridge cluster`` commands.
"""
