"""The loopback measurement of `fedbt bench --deployment`: each way of sending carries the whole payload."""

from __future__ import annotations

from fedbt.deployment.loopback import loopback_rates


def test_every_way_of_sending_a_payload_over_loopback_is_timed():
    rates = loopback_rates(2.0)
    assert set(rates) == {"tcp", "tls", "https_post", "sha256"}
    assert all(rate > 0 for rate in rates.values()), rates
