"""make test's two pytest-xdist workers (--dist loadgroup): the tests marked ``xdist_group`` run on one worker, so a
module fixture they share (a search) is computed once. xdist marks a test's group by appending ``@<group>`` to its
node id, which its scheduler splits on; pytest 9.2 broke that silently (pytest-dev/pytest-xdist#1386: the node id
stays as it was, the marks are ignored and each worker computes the fixture), hence setup.cfg's pin."""

from __future__ import annotations

import pytest

from tests.conftest import long_seconds


@pytest.mark.xdist_group("scheduling-check")
def test_a_grouped_test_carries_its_group_to_the_scheduler(request):
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not under pytest-xdist --dist loadgroup (make test)")
    assert request.node.nodeid.endswith("@scheduling-check"), request.node.nodeid


def test_long_tests_are_collected_first_longest_first(request):
    seconds = [long_seconds(item) for item in request.session.items]
    assert seconds == sorted(seconds, reverse=True)
