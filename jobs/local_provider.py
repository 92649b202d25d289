"""The local cluster's node provider: Ray's fake multi-node provider, plus what a cloud does when a
worker node dies.

The fake provider keeps a node in its list until the autoscaler terminates it, and the autoscaler
never does for a node whose raylet died: with node updaters off (which the fake provider needs) the
node's status tag stays ``uninitialized``, and the liveness check skips nodes that are not
``up-to-date``; a ``request_resources`` standing for its resources keeps it from idle removal too.
So a killed node held its slot of the node type forever, and the autoscaler refused to launch its
replacement ("could not find a node type to satisfy the request"): a job that lost a node waited
for ever (seen in CI: an encode and the next test's training, 20 min without a GPU node).

On a cloud a lost instance leaves the provider's list and the autoscaler replaces it. This
provider does the same: a worker node whose raylet process has exited is dropped from the list
(its remaining processes killed) the next time the autoscaler asks for the nodes.

Runs inside the autoscaler (the head's monitor process): ``autoscaling_config`` names it as an
``external`` provider, and the namespace's PYTHONPATH lets the monitor import it.
"""
from __future__ import annotations

import logging

from ray._private import ray_constants
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
from ray.autoscaler.tags import TAG_RAY_USER_NODE_TYPE

log = logging.getLogger(__name__)


class LocalNodeProvider(FakeMultiNodeProvider):
    """Ray's fake multi-node provider whose nodes leave the list when their raylet dies."""

    def non_terminated_nodes(self, tag_filters):
        self._forget_lost_nodes()
        return super().non_terminated_nodes(tag_filters)

    def _forget_lost_nodes(self) -> None:
        with self.lock:
            lost = [node_id for node_id, entry in self._nodes.items() if raylet_exited(entry.get("node"))]
            for node_id in lost:
                entry = self._nodes.pop(node_id)
                log.warning("node %s (type %s) lost: its raylet exited; removed from the provider's nodes so "
                            "the autoscaler can replace it", node_id, entry["tags"].get(TAG_RAY_USER_NODE_TYPE))
                self._terminate_node(entry)


def raylet_exited(node) -> bool:
    """Whether a fake worker node's raylet process has exited (False for the head, which has no
    ``Node`` here, and for a node whose raylet is running)."""
    if node is None:
        return False
    infos = node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET) or []
    return bool(infos) and infos[0].process.poll() is not None
