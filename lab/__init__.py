"""The lab: a Tabby cluster in network namespaces on one machine (`tabbyctl lab`).

Nothing here touches the root network namespace: the underlay bridge, etcd, the nodes and the
pods each live in a namespace named `tabby-lab-<lab>-...`, and every namespace, process and path
a lab makes is recorded in its state file so `lab down` can remove it all, even after a crash.
"""

from __future__ import annotations

from datastore.errors import TabbyError


class LabError(TabbyError):
    """A lab operation failed; str() says what and what to do (printed as one line)."""
