"""The replica driver's address book and peer links: ``PeerLinks``.

Which address each replica id has (from ``--peers``, from membership changes and
from the address book saved with every snapshot), one ``PeerLink`` per peer, the
links a leader opens to learners (standbys) and closes when the core forgets them,
and the snapshot envelope that carries the address book through compaction.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import msgspec

from lepton_ai.consensus.peer_messages import PeerMessage, Value
from lepton_ai.consensus.transport import PeerLink, TransportConfig
from lepton_ai.wire import Codec


class SnapshotEnvelope(msgspec.Struct, array_like=True):
    """What the driver stores as a core snapshot: the state machine's own snapshot plus
    the replica address book, so members added at run time survive compaction."""

    state: bytes
    addresses: dict[int, str]


_envelope_encoder = msgspec.msgpack.Encoder()
_envelope_decoder: msgspec.msgpack.Decoder[SnapshotEnvelope] = msgspec.msgpack.Decoder(
    SnapshotEnvelope
)


def encode_snapshot(state: bytes, addresses: dict[int, str]) -> bytes:
    return _envelope_encoder.encode(SnapshotEnvelope(state, addresses))


def decode_snapshot(data: bytes) -> SnapshotEnvelope:
    return _envelope_decoder.decode(data)


class PeerLinks:
    """The address book of one replica and its links to the other replicas."""

    def __init__(
        self,
        node_id: int,
        addresses: dict[int, str],
        *,
        token: str,
        codec: Codec[object],
        transport: TransportConfig,
    ) -> None:
        self.node_id = node_id
        self._token = token
        self._codec = codec
        self._transport = transport
        self.addresses = dict(addresses)
        self.links: dict[int, PeerLink] = {}
        for peer, address in self.addresses.items():
            if peer != self.node_id:
                self.links[peer] = self.new_link(peer, address)
        self._extra_tasks: set[asyncio.Task[None]] = set()
        # Links the leader opened to learners (standbys), by node: closed when the core
        # forgets the learner, kept (as a member's) once a change adds it.
        self._learner_links: dict[int, asyncio.Task[None]] = {}

    def send(self, messages: Sequence[tuple[int, PeerMessage]]) -> None:
        """One write per peer."""
        if not messages:
            return
        by_peer: dict[int, list[PeerMessage]] = {}
        for to, msg in messages:
            by_peer.setdefault(to, []).append(msg)
        for to, msgs in by_peer.items():
            link = self.links.get(to)
            if link is not None:
                link.send_many(msgs)

    def new_link(self, peer: int, address: str) -> PeerLink:
        return PeerLink(
            self.node_id,
            peer,
            address,
            token=self._token,
            codec=self._codec,
            config=self._transport,
        )

    def add_member(self, node: int, address: str) -> None:
        """Link to ``node`` now: the joint quorum may need the newcomer before the change
        that adds it commits."""
        self.addresses[node] = address
        if node not in self.links and node != self.node_id:
            link = self.new_link(node, address)
            self.links[node] = link
            self.spawn(link)

    def learn_addresses(self, addresses: dict[int, str], members: tuple[int, ...]) -> None:
        """The address book saved with an installed snapshot (members added at run time
        are not in ``--peers``), then a link to every member."""
        for node, address in addresses.items():
            self.addresses.setdefault(node, address)
        self.link_members(members)

    def link_members(self, members: tuple[int, ...]) -> None:
        for peer in members:
            if peer != self.node_id and peer not in self.links and peer in self.addresses:
                link = self.new_link(peer, self.addresses[peer])
                self.links[peer] = link
                self.spawn(link)

    def learn_config(self, value: Value) -> None:
        """Learn the address a membership change carries and link to every member in it."""
        payload = value.commands[0] if value.commands else b""
        if payload:
            node_text, _, address = payload.decode().partition("=")
            if node_text.isdigit():
                self.addresses.setdefault(int(node_text), address)
        self.link_members(value.members)

    def spawn(self, link: PeerLink) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(link.run(), name=f"peer-link-{link.peer_id}")
        self._extra_tasks.add(task)
        task.add_done_callback(self._extra_tasks.discard)
        return task

    # -- learners -------------------------------------------------------------------------
    @property
    def has_learner_links(self) -> bool:
        return bool(self._learner_links)

    def sync_learners(self, wanted: dict[int, str]) -> None:
        """Link to every learner the leading core streams the log to (``wanted``: at the
        address it announced), and drop the links of learners it forgot. Bounded by the
        core's ``learners_max``."""
        for node, address in wanted.items():
            link = self.links.get(node)
            moved = link is not None and link.address != address
            if moved and node in self._learner_links and node not in self.addresses:
                self.drop_learners([node])  # restarted elsewhere: redial
                link = None
            if link is None and node != self.node_id and valid_address(address):
                link = self.new_link(node, address)
                self.links[node] = link
                self._learner_links[node] = self.spawn(link)
        forgotten = [n for n in self._learner_links if n not in wanted]
        if forgotten:
            self.drop_learners(forgotten)

    def drop_learners(self, nodes: list[int]) -> None:
        """Close the links to ``nodes``, except those of learners a membership change
        made members (in ``addresses``: their link is an ordinary peer link now)."""
        for node in nodes:
            task = self._learner_links.pop(node, None)
            if task is None or node in self.addresses:
                continue
            task.cancel()
            self.links.pop(node, None)

    def drop_all_learners(self) -> None:
        self.drop_learners(list(self._learner_links))

    async def close(self) -> None:
        """Stop the links spawned at run time (the initial ones run in the driver's
        task group)."""
        for task in list(self._extra_tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"bad replica address {address!r}; expected host:port")


def valid_address(address: str) -> bool:
    try:
        check_address(address)
    except ValueError:
        return False
    return True
