"""The Raft protocol as a pure object (sans-IO, as h11 and openraft's Engine).

Inputs are method calls; outputs are :mod:`~pyraft.engine.commands`, taken
with :meth:`Engine.take_output`.  The engine never reads a clock (``tick(now)``
gives it the time), never draws random numbers itself (a seeded ``rng`` with
``uniform(a, b)`` is passed in) and does no I/O.  Every Raft rule of pyraft
lives here, once.

Role dispatch is in one place (:meth:`_become_follower`,
:meth:`_become_candidate`, :meth:`_become_leader`); the shared term rules
are in :meth:`step`.

Field invariants::

    purged <= applied <= committed <= last_log_id          (by index)
    flushed <= last_log_id;  a leader counts itself up to flushed only
    memberships[0] is committed (or the initial/snapshot one); the rest are
    the uncommitted membership entries in the log, in order; the effective
    membership is memberships[-1]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..config import Config
from ..errors import ChangeMembershipError, ForwardToLeader, InitializeError
from ..messages import (AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest,
                        InstallSnapshotResponse, TimeoutNowRequest, TimeoutNowResponse, VoteRequest,
                        VoteResponse)
from ..types import (Entry, EntryKind, LogId, Membership, Node, ServerState, SnapshotMeta,
                     StoredMembership, Vote, log_id_run, log_index, normal_entries)
from .commands import (Apply, AppendToLog, BuildSnapshot, InstallSnapshot, PurgeLog,
                       ReceiveSnapshotChunk, Replicate, Respond, RespondRead, SaveCommitted, SaveVote,
                       SendSnapshot, SendTimeoutNow, SendVote, TruncateLog, UpdateReplication)
from .log_ids import LogIdList
from .progress import Progress, ProgressState
from .refusals import MAX_TERM, check_message

# Enum members as module globals: reading one as a class attribute goes through EnumType's
# __getattr__ hook (a Python-level lookup, several times the cost of a global), and the engine
# compares states on nearly every call.
_LEADER, _FOLLOWER, _CANDIDATE, _LEARNER = (ServerState.LEADER, ServerState.FOLLOWER, ServerState.CANDIDATE,
                                            ServerState.LEARNER)
_PROBE, _REPLICATE, _SNAPSHOT = ProgressState.PROBE, ProgressState.REPLICATE, ProgressState.SNAPSHOT
_BLANK, _NORMAL, _MEMBERSHIP = EntryKind.BLANK, EntryKind.NORMAL, EntryKind.MEMBERSHIP

_NEVER = float("-inf")
#: The share of the minimum election timeout a read lease lasts past the send time of the round a
#: quorum acknowledged (see :meth:`Engine.read_lease`): the rest allows for the nodes' clocks running
#: at rates up to 10 % apart.
LEASE_SHARE = 0.9


@dataclass
class RestoredState:
    """What a node finds in its stores at start-up.

    ``memberships``: the membership applied last to the state machine (or in
    its snapshot), then every membership entry in the log after it, in order.
    ``term_at(i)`` reads the term of log entry ``i`` (used only while the
    engine is constructed, to index the terms).
    """

    vote: Vote | None = None
    last_purged: LogId | None = None
    last_log_id: LogId | None = None
    committed: LogId | None = None
    applied: LogId | None = None
    snapshot: SnapshotMeta | None = None
    memberships: Sequence[StoredMembership] = ()
    term_at: Callable[[int], int | None] = lambda i: None


@dataclass(frozen=True, slots=True)
class Campaign:
    """An election this node started, and why (the runtime logs each one at INFO).

    ``number`` counts this engine's elections; a pre-vote round that wins goes
    on as the real election under the same number.  ``refused``: the node
    wanted to campaign but cannot (its term has no successor it may enter);
    recorded once, not at every timeout.
    """

    number: int
    term: int
    pre_vote: bool
    reason: str
    refused: bool = False


@dataclass(slots=True)
class _Farewell:
    """A removed node the leader still replicates to, until it acknowledges a heartbeat round
    (``seq``) sent after it held the configuration that removes it (at index ``until``): that
    heartbeat's commit index told it the removal is committed."""

    node: Node
    deadline: float
    until: int
    seq: int = 0  # 0 until the node holds the configuration


class Engine:
    def __init__(self, node_id: int, config: Config, rng: Any, now: float,
                 restored: RestoredState | None = None) -> None:
        r = restored or RestoredState()
        self.id = node_id
        self.cfg = config
        self.rng = rng
        self.now = now
        self._out: list = []

        self.vote: Vote = r.vote or Vote(0, None)
        self.log = LogIdList.load(r.last_purged, r.last_log_id, r.term_at)
        #: the durable prefix of the log: everything found at start-up is durable
        self.flushed: LogId | None = self.log.last
        saved = r.committed
        if saved is not None and saved.index > self.log.purged_index:
            # A saved commit point can run ahead of the durable log: the appends it
            # covered, or the truncation of stale entries before them, may have been
            # lost with unflushed writes.  Trust it only where the log holds an entry
            # of its term (only that term's leader wrote those, and that leader's log
            # up to the commit point is committed); else fall back to the snapshot.
            i = min(saved.index, self.log.last_index)
            saved = LogId(saved.term, i) if self.log.term_at(i) == saved.term else None
        cands = [x for x in (saved, r.applied, r.last_purged) if x is not None]
        self.committed: LogId | None = max(cands, key=lambda l: l.index) if cands else None
        self.applied: LogId | None = r.applied
        self._apply_submitted = log_index(r.applied)
        self.snapshot: SnapshotMeta | None = r.snapshot
        self._building_snapshot = False
        #: the last index of the newest snapshot handed to the state machine and not yet installed
        self._installing = 0
        #: a purge that in-flight replication held back; tick() retries it (index, 0: none)
        self._purge_wanted = 0
        self.memberships: list[StoredMembership] = list(r.memberships)

        self.state = _FOLLOWER
        self.leader_id: int | None = None
        self._last_leader_contact = _NEVER
        #: CheckQuorum's vote guard: no vote or pre-vote (bar a transfer's) before then.
        #: With lease reads, a node that may have followed a leader in an earlier life (its term is
        #: past 0) starts guarded for a minimum election timeout: it may have acknowledged a round a
        #: leader's read lease counts on, and forgot it in the restart.  Nothing else relies on it.
        self._vote_guard_until = (now + config.election_timeout[0] if config.lease_reads and self.vote.term > 0
                                  else _NEVER)
        #: the leader heard from at _last_leader_contact (leader_id is cleared when the term moves on)
        self._last_leader_seen: int | None = None
        #: the last term this engine led (a second leader of it is refused; see refusals.py)
        self.led_term = -1
        #: the newest election this node started, and why (None: none since it started)
        self.last_campaign: Campaign | None = None
        self._initialized_now = False
        self._election_deadline = now
        self._pre_vote_phase = False
        self._granted: set[int] = set()
        #: since our last campaign, a vote refusal or request showed a log ahead of ours
        self._log_behind = False

        # leader state
        self.progress: dict[int, Progress] = {}
        #: the targets (and their nodes) of the last UpdateReplication this leader emitted
        self._repl_nodes: dict[int, Node] = {}
        self._leader_since = now
        self._heartbeat_due = now
        self._seq = 0
        #: lease reads: the engine time each round number (``_seq``) of this leadership was
        #: assigned, younger than a minimum election timeout
        self._seq_sent: dict[int, float] = {}
        #: lease reads end for the rest of the term once a transfer's TimeoutNow is sent
        self._lease_forfeit = False
        #: the index of this leader's first entry of its term (its blank entry)
        self._term_start = 0
        self._dirty: set[int] = set()
        self._heartbeat_requested = False
        self._pending_reads: list[tuple[Any, LogId | None, int]] = []
        self._reads_waiting_commit: list[Any] = []
        self.transferee: int | None = None
        self._transfer_deadline = 0.0
        #: nodes a committed configuration removed, still replicated to until they know it
        self._farewell: dict[int, _Farewell] = {}

        # follower state: AppendEntries responses waiting for their entries to be flushed, as
        # (reply token, matched, seq, term of the request they answer)
        self._pending_acks: list[tuple[Any, LogId | None, int, int]] = []

        self._startup_repairs()
        # The invariant: memberships[0] is the committed configuration (the restored list
        # starts at the state machine's, and may hold entries the saved commit point covers).
        while len(self.memberships) > 1 and log_index(self.memberships[1].log_id) <= log_index(self.committed):
            self.memberships.pop(0)
        self._become_follower(self.vote.term, None)
        self._maybe_apply()

    # ------------------------------------------------------------------ views

    @property
    def current_term(self) -> int:
        return self.vote.term

    @property
    def last_log_id(self) -> LogId | None:
        return self.log.last

    @property
    def purged(self) -> LogId | None:
        return self.log.purged

    @property
    def membership(self) -> StoredMembership | None:
        """The effective membership: the last one in the log (even uncommitted)."""
        return self.memberships[-1] if self.memberships else None

    @property
    def effective_membership(self) -> StoredMembership:
        """``membership`` where the node must have one: every path past initialize (or a snapshot) does."""
        m = self.membership
        assert m is not None, "no membership before initialize or a snapshot"
        return m

    @property
    def committed_membership(self) -> StoredMembership | None:
        if not self.memberships:
            return None
        return self.memberships[0]

    @property
    def leader_node(self) -> Node | None:
        m = self.membership
        if self.leader_id is None or m is None:
            return None
        return m.membership.nodes.get(self.leader_id)

    def is_voter(self) -> bool:
        m = self.membership
        return m is not None and m.membership.is_voter(self.id)

    def _membership_durable(self) -> bool:
        """Our first configuration is on disk.  A vote saved before it (votes are saved at once,
        entries when flushed) could outlive it: after a crash right after initialize() the node
        would have a term but no configuration, and could neither campaign nor be initialized."""
        first = self.committed_membership
        return first is not None and log_index(first.log_id) <= log_index(self.flushed)

    def _may_campaign(self) -> bool:
        """A voter of the latest configuration campaigns; so does a voter of the committed one
        that an uncommitted configuration leaves out.  Until that entry commits, this node may
        hold the only log the others can vote for (a leader deposed between appending C_new and
        committing it; cf. Raft thesis 4.2.2, and ScyllaDB raft's "candidate outside the
        configuration").  Its own vote does not count, and it hands over once C_new commits."""
        if not self._membership_durable():
            return False
        if self.is_voter():
            return True
        first = self.committed_membership
        return first is not None and first.membership.is_voter(self.id)

    def replication(self) -> dict[int, LogId | None]:
        """On the leader, each target's matched log id."""
        return {t: p.matched for t, p in self.progress.items()}

    @property
    def removed(self) -> bool:
        """This node knows that a committed configuration left it out of the cluster: it no longer campaigns."""
        first = self.committed_membership
        return (first is not None and self.id not in first.membership.nodes
                and self.id not in self.effective_membership.membership.nodes)

    def is_pristine(self) -> bool:
        return self.vote.term == 0 and self.log.last is None and not self.memberships

    # ------------------------------------------------------------------ output

    def take_output(self) -> list:
        """Return and clear the commands produced so far (replication sends are coalesced here)."""
        if self.state == _LEADER:
            if self._heartbeat_requested:
                self._heartbeat_requested = False
                self._broadcast_heartbeat()
            if self._dirty:
                for t in sorted(self._dirty):
                    self._send_append(t)
                self._dirty.clear()
        out, self._out = self._out, []
        return out

    def _emit(self, cmd: Any) -> None:
        if isinstance(cmd, AppendToLog) and self._out and isinstance(self._out[-1], AppendToLog):
            self._out[-1].entries.extend(cmd.entries)
            return
        self._out.append(cmd)

    # ------------------------------------------------------------------ time

    def _election_timeout(self) -> float:
        lo, hi = self.cfg.election_timeout
        return self.rng.uniform(lo, hi)

    def _reset_election_timer(self) -> None:
        self._election_deadline = self.now + self._election_timeout()
        if self._log_behind:
            self._election_deadline += self.cfg.election_timeout[1]

    def _note_log_of(self, last: LogId | None) -> None:
        """A voter refused us, or a candidate asked for our vote, and its log ends at ``last``.  If
        that is ahead of ours, our election timer runs an extra maximum election timeout, until our
        next campaign (openraft's "seen a greater log"): that voter never votes for us, and that
        candidate, or a node with a log like the voter's, could win where we cannot.  Without
        PreVote, candidates with stale logs keep raising the term; when their (stale) configuration
        does not list the up-to-date node, it learns their terms only from refusals of its own
        requests, and campaigning no more often than they do, it would nearly always ask in a term
        they had already taken (sim seeds 1000095, 1004160, 1000502)."""
        if self.state == _LEADER:
            return
        if last is not None and not self._log_behind and (self.log.last is None or last > self.log.last):
            self._log_behind = True
            self._election_deadline += self.cfg.election_timeout[1]

    def _in_leader_lease(self) -> bool:
        """True while this node believes a leader is alive (CheckQuorum's vote guard).

        A follower is guarded for a minimum election timeout after it last took
        a message of its leader (the Raft thesis, 4.2.3), whatever happens to
        its term meanwhile; a leader while it leads; with lease reads, a
        restarted node for a minimum election timeout after it starts.  Read
        leases rest on this guard: a quorum that acknowledged a leader's round
        refuses every other candidate until the lease the round gave has ended.
        """
        if not self.cfg.check_quorum:
            return False
        if self.state == _LEADER:
            return True
        return self.now < self._vote_guard_until

    def _next_seq(self) -> int:
        """A new round number (heartbeat rounds, reads, farewells); lease reads note when it was assigned."""
        self._seq += 1
        if self.cfg.lease_reads:
            sent = self._seq_sent
            sent[self._seq] = self.now
            oldest = self.now - self.cfg.election_timeout[0]
            while True:  # in the order assigned: each round is dropped once it is too old to give a lease
                first = next(iter(sent))
                if sent[first] >= oldest:
                    break
                del sent[first]
        return self._seq

    def _lease_start(self) -> float | None:
        """The newest time a quorum of the effective configuration is known to have followed this
        leader: each voter acknowledged a round of this term assigned at or after it (the leader
        counts as always).  A voter took that round's message no earlier than the round was
        assigned, whichever configuration was in effect then.  None when no young round gives one."""
        m = self.effective_membership.membership
        if m.is_quorum({self.id}):
            return self.now
        sent = self._seq_sent
        since: dict[int, float] = {}
        for t in m.voter_ids:
            if t == self.id:
                continue
            p = self.progress.get(t)
            if p is not None:
                at = sent.get(p.acked_seq)
                if at is not None:
                    since[t] = at
        for at in sorted(set(since.values()), reverse=True):
            if m.is_quorum({self.id} | {t for t, x in since.items() if x >= at}):
                return at
        return None

    def read_lease(self) -> tuple[float, int] | None:
        """With ``Config.lease_reads``: ``(until, applied_from)`` while this leader may serve a
        linearizable read without a heartbeat round, else None.

        Until engine time ``until`` no other node can be elected: a quorum of
        the effective configuration acknowledged a round of this leader sent at
        most ``LEASE_SHARE`` of a minimum election timeout before, and each of
        them refuses votes for a whole one after taking it (the guard of
        :meth:`_in_leader_lease`).  A read is linearizable once the state
        machine has applied ``applied_from``, this leader's first entry of its
        term: everything committed before the term is then applied, and what
        the leader committed since is acknowledged only once applied.  The
        caller compares ``until`` with a clock read at the moment of the read,
        not with the engine's time, which lags.

        None unless this node leads, the effective configuration is committed,
        no transfer is under way, and none sent its TimeoutNow in this term.

        A leader that steps down may vote at once, like any follower whose
        guard has run out: whoever serves reads must withdraw the lease before
        carrying out any output that follows (RaftCore asks for it again before
        each batch of output), so a read that found the lease holding found it
        while this node still led and refused every vote, and is linearized
        there.  The simulation takes the lease from this method at every
        event, and ``sim.teeth``'s lease mutants show what each rule guards.
        """
        if not self.cfg.lease_reads or self.state != _LEADER or self._lease_forfeit \
                or self.transferee is not None:
            return None
        if log_index(self.effective_membership.log_id) > log_index(self.committed):
            return None
        start = self._lease_start()
        if start is None:
            return None
        return start + self.cfg.election_timeout[0] * LEASE_SHARE, self._term_start

    def advance_clock(self, now: float) -> None:
        """Set the time that stamps the inputs that follow, without firing timers.

        The runtime calls it when it takes messages off its inbox, handles
        them, then calls :meth:`tick`: a message is never judged late because
        the thread was slow to get to it.
        """
        if now > self.now:
            self.now = now

    def tick(self, now: float) -> None:
        """Advance the clock to ``now`` and fire whatever timers are due."""
        self.advance_clock(now)
        if self._purge_wanted > self.log.purged_index:
            self._maybe_purge(self._purge_wanted)
        if self.state == _LEADER:
            self._tick_leader()
        elif self.now >= self._election_deadline:
            reason = self._timeout_reason()
            self._reset_election_timer()
            if self._may_campaign():
                self._campaign(pre_vote=self.cfg.pre_vote, reason=reason)

    def _timeout_reason(self) -> str:
        if self._initialized_now:
            return "initialize() was called: the first election starts at once"
        if self.state == _CANDIDATE and self.last_campaign is not None:
            c = self.last_campaign
            return f"election timeout: the {'pre-vote' if c.pre_vote else 'election'} for term {c.term} was not won"
        if self._last_leader_contact == _NEVER:
            return "election timeout: no leader heard from since this node started"
        return (f"election timeout: last heard from leader {self._last_leader_seen} "
                f"{self.now - self._last_leader_contact:.2f} s ago")

    def _tick_leader(self) -> None:
        if self.transferee is not None and self.now >= self._transfer_deadline:
            self.transferee = None  # transfer failed: serve again
        for t in [t for t, f in self._farewell.items() if self.now >= f.deadline]:
            self._end_farewell(t)  # unreachable: it goes on campaigning (without PreVote, disruptively)
        if self.cfg.check_quorum and self.now - self._leader_since >= self.cfg.election_timeout[1]:
            window = self.cfg.election_timeout[1]
            active = {self.id} | {t for t, p in self.progress.items() if self.now - p.last_ack <= window}
            if not self.effective_membership.membership.is_quorum(active):
                self._become_follower(self.vote.term, None)
                return
        if self.now >= self._heartbeat_due:
            self._heartbeat_due = self.now + self.cfg.heartbeat_interval
            self._broadcast_heartbeat()

    # ------------------------------------------------------------------ roles

    def _set_vote(self, vote: Vote) -> None:
        if vote != self.vote:
            self.vote = vote
            self._emit(SaveVote(vote))

    def _refresh_role(self) -> None:
        """A follower becomes a learner when its membership drops it as a voter, and back."""
        if self.state in (_FOLLOWER, _LEARNER):
            self.state = _FOLLOWER if self.is_voter() else _LEARNER

    def _become_follower(self, term: int, leader_id: int | None, reset_timer: bool = True) -> None:
        was_leader = self.state == _LEADER
        if term > self.vote.term:
            self._set_vote(Vote(term, None))
        self.state = _FOLLOWER if self.is_voter() else _LEARNER
        self.leader_id = leader_id
        self._pre_vote_phase = False
        self._granted = set()
        if was_leader:
            self._stop_leading()
        if reset_timer or was_leader:
            self._reset_election_timer()

    def _stop_leading(self) -> None:
        self.progress = {}
        self._farewell = {}
        self._dirty.clear()
        self._heartbeat_requested = False
        self.transferee = None
        for token, _lid, _seq in self._pending_reads:
            self._emit(RespondRead(token, None, False, self.leader_id))
        for token in self._reads_waiting_commit:
            self._emit(RespondRead(token, None, False, self.leader_id))
        self._pending_reads = []
        self._reads_waiting_commit = []
        self._emit(UpdateReplication(self.vote.term, {}))

    def _campaign(self, pre_vote: bool, transfer: bool = False, reason: str = "") -> None:
        last = self.last_campaign
        if self.vote.term + 1 > MAX_TERM:
            # Only a forged term (or a cluster bricked before terms were bounded) gets here: the
            # wire format cannot carry the next term.  Not Fatal: the node still follows and
            # serves reads of what it applied; see refusals.MAX_TERM.
            if last is None or not last.refused:
                self.last_campaign = Campaign(last.number + 1 if last else 1, self.vote.term, pre_vote,
                                              f"cannot campaign ({reason}): term {self.vote.term} has no "
                                              f"successor the wire format can carry", refused=True)
            return
        if self.cfg.lease_reads and not transfer and self._in_leader_lease():
            # Our own vote is one a read lease counts on, as much as one we would give another
            # node: no campaign while the guard holds (trigger.elect() on a follower of a live
            # leader; the election timer never fires that early).
            return
        self._initialized_now = False
        if reason:  # a new election (a pre-vote round that won goes on under the same number)
            self.last_campaign = Campaign(last.number + 1 if last else 1, self.vote.term + 1, pre_vote, reason)
        elif last is not None:
            self.last_campaign = Campaign(last.number, self.vote.term + 1, pre_vote, last.reason)
        voters = self.effective_membership.membership.voter_ids
        self.leader_id = None
        self.state = _CANDIDATE
        self._granted = {self.id}
        self._log_behind = False
        self._reset_election_timer()
        if pre_vote:
            self._pre_vote_phase = True
            term = self.vote.term + 1
        else:
            self._pre_vote_phase = False
            term = self.vote.term + 1
            self._set_vote(Vote(term, self.id))
        if self.effective_membership.membership.is_quorum(self._granted):
            if pre_vote:
                return self._campaign(pre_vote=False, transfer=transfer)
            return self._become_leader()
        req = VoteRequest(term, self.id, self.log.last, pre_vote=pre_vote, transfer=transfer)
        targets = tuple(sorted(voters - {self.id}))
        self._emit(SendVote(targets, req))

    def _become_leader(self) -> None:
        self.state = _LEADER
        self.led_term = self.vote.term
        self._log_behind = False
        self.leader_id = self.id
        self._pre_vote_phase = False
        self._leader_since = self.now
        self._heartbeat_due = self.now
        self.transferee = None
        self._lease_forfeit = False
        self._seq_sent.clear()
        self.progress = {}
        self._sync_progress(force=True)
        # The paper's Figure 8: a leader commits entries of earlier terms only
        # by committing one of its own, so it starts its term with a blank one.
        self._term_start = self._append_as_leader([(_BLANK, None)])[0].index
        self._heartbeat_requested = True

    def _replication_targets(self) -> dict[int, Node]:
        """Whom a leader replicates to: every member of the committed configuration and of the
        uncommitted ones after it (until a removal commits, the removed node is a member, and it
        must get the entry that removes it), and the nodes still being told of their removal."""
        out = {t: f.node for t, f in self._farewell.items()}
        for sm in self.memberships:  # oldest first: the newest address of a node wins
            out.update(sm.membership.nodes)
        out.pop(self.id, None)
        return out

    def _sync_progress(self, force: bool = False) -> None:
        """Make the replication targets match the configurations (leader only)."""
        nodes = self._replication_targets()
        changed = False
        for t in list(self.progress):
            if t not in nodes:
                del self.progress[t]
                self._dirty.discard(t)
                changed = True
        for t in nodes:
            if t not in self.progress:
                self.progress[t] = Progress(self.log.last_index + 1, self.now)
                self._dirty.add(t)
                changed = True
        targets = {t: nodes[t] for t in sorted(nodes)}
        # A target whose address changed (add_learner again with a new Node) needs a new worker too.
        if changed or force or targets != self._repl_nodes:
            self._repl_nodes = targets
            self._emit(UpdateReplication(self.vote.term, targets))

    def _begin_farewells(self, before: Mapping[int, Node]) -> None:
        """A configuration that removes nodes committed: keep replicating to them until they know.

        A removed voter that never learns that its removal committed goes on
        campaigning for ever (it may hold the only log the others could elect
        until then, see _may_campaign).  So it gets heartbeats until it
        acknowledges one whose commit index covers the configuration, or for
        one election timeout at most.
        """
        gone = set(before) - set(self._replication_targets())
        until = log_index(self.memberships[0].log_id)
        deadline = self.now + self.cfg.election_timeout[1]
        for t in gone:
            self._farewell[t] = f = _Farewell(before[t], deadline, until)
            self._maybe_end_farewell(t, f, None)

    def _maybe_end_farewell(self, t: int, f: _Farewell, ack: AppendEntriesResponse | None) -> None:
        p = self.progress.get(t)
        if p is None or p.matched_index < f.until:
            return
        if not f.seq:
            # It holds the configuration: a heartbeat round from now on carries a commit index
            # covering it (a heartbeat asks from the matched index on).
            f.seq = self._next_seq()
            self._heartbeat_requested = True
        elif ack is not None and ack.success and ack.seq >= f.seq:
            self._end_farewell(t)

    def _end_farewell(self, t: int) -> None:
        del self._farewell[t]
        self._sync_progress()

    # ------------------------------------------------------------------ client inputs

    def _check_leader(self) -> None:
        if self.state != _LEADER:
            raise ForwardToLeader(self.leader_id, self.leader_node)
        if self.transferee is not None:
            m = self.effective_membership.membership
            raise ForwardToLeader(self.transferee, m.nodes.get(self.transferee),
                                  f"leadership is being transferred to {self.transferee}")
        if not self.effective_membership.membership.is_voter(self.id):
            # A configuration without this leader is in the log: it only waits for that
            # entry to commit, then hands over.  Accepting nothing more means every
            # entry it appended commits with that entry, so no client of it is left
            # waiting on a node the new leader never replicates to.
            raise ForwardToLeader(None, None, f"leader {self.id} is leaving the cluster")

    def initialize(self, nodes: Mapping[int, Node]) -> None:
        """Write the initial membership on a pristine node; it then campaigns at once."""
        if not self.is_pristine():
            raise InitializeError(f"node {self.id} is not pristine (term {self.vote.term}, "
                                  f"last log {self.log.last}); initialize only a new node")
        if not nodes:
            raise InitializeError("the initial membership cannot be empty")
        if self.id not in nodes:
            raise InitializeError(f"node {self.id} is not in the initial membership {sorted(nodes)}")
        shared = _shared_address(nodes)
        if shared:
            raise InitializeError(f"nodes {shared[1]} have the same address {shared[0]!r}: one would never be "
                                  f"reached (and a majority might need it)")
        m = Membership.of(dict(nodes))
        entry = Entry(LogId(0, 1), _MEMBERSHIP, m)
        self._append(entry)
        self.state = _FOLLOWER
        self._election_deadline = self.now  # campaign at the next tick
        self._initialized_now = True

    def propose(self, payloads: Sequence[Any]) -> list[LogId]:
        """Append client commands; returns their log ids.  Raises ForwardToLeader.

        ``_append_as_leader`` for a batch of normal entries, with the work per
        batch rather than per entry (one run of one term, one AppendToLog).
        """
        self._check_leader()
        if not payloads:
            return []
        term = self.vote.term
        first = self.log.last_index + 1
        lids = log_id_run(term, first, len(payloads))
        self.log.append_run(lids[0], lids[-1])
        self._emit(AppendToLog(normal_entries(lids, payloads)))
        self._dirty.update(self.progress)
        if not self.progress:
            self._maybe_commit()
        return lids

    def add_learner(self, node_id: int, node: Node) -> LogId | None:
        """Propose a membership with ``node_id`` as a learner; None when nothing changes."""
        self._check_leader()
        m = self._membership_for_change()
        if m.is_voter(node_id):
            raise ChangeMembershipError(f"node {node_id} is already a voter")
        if m.nodes.get(node_id) == node:
            return None
        nodes = {**m.nodes, node_id: node}
        shared = _shared_address(nodes)
        if shared:
            raise ChangeMembershipError(f"node {node_id}'s address {shared[0]!r} is that of node "
                                        f"{[i for i in shared[1] if i != node_id][0]} already")
        new = Membership(configs=m.configs, nodes=nodes)
        return self._append_as_leader([(_MEMBERSHIP, new)])[0]

    def remove_learner(self, node_id: int) -> LogId | None:
        """Propose a membership without the learner ``node_id``; None when it is not a member.

        Once that entry commits, the leader stops replicating to the node
        (after telling it, see :meth:`_begin_farewells`).  A voter is removed
        with :meth:`change_membership` instead.
        """
        self._check_leader()
        m = self._membership_for_change()
        if m.is_voter(node_id):
            raise ChangeMembershipError(f"node {node_id} is a voter, not a learner; "
                                        f"remove it with change_membership")
        if node_id not in m.nodes:
            return None
        new = Membership(configs=m.configs, nodes={k: v for k, v in m.nodes.items() if k != node_id})
        return self._append_as_leader([(_MEMBERSHIP, new)])[0]

    def lagging(self, node_ids: Iterable[int]) -> dict[int, int]:
        """Those of ``node_ids`` (leader only) whose log is not caught up: id -> entries behind the commit point.

        Caught up means: the target has acknowledged entries of this leader
        (so it runs, and it is the node at that address), has answered within
        an election timeout, and its log is within one AppendEntries
        (``max_payload_entries``) of the leader's commit point.  (Counting
        entries only, a learner that never answered is "caught up" with a
        young cluster's log: promoting it stalls the cluster until it comes.)
        """
        commit = log_index(self.committed)
        window = self.cfg.election_timeout[1]
        out = {}
        for t in node_ids:
            p = self.progress.get(t)
            behind = commit - (p.matched_index if p is not None else 0)
            if t != self.id and (p is None or p.matched is None or self.now - p.last_ack > window
                                 or behind > self.cfg.max_payload_entries):
                out[t] = behind
        return out

    def change_membership(self, voter_ids: Iterable[int], retain: bool = False) -> LogId | None:
        """Start a joint-consensus change to ``voter_ids``; None when nothing changes.

        The leader finalizes the joint configuration itself once it commits
        (see :meth:`_on_commit_advanced`).  Every new voter must have caught
        up first (:meth:`lagging`): a joint configuration needs a majority of
        the new voters to commit anything, and new voters still downloading
        the log would stall every write until they are done.
        """
        self._check_leader()
        voters = frozenset(voter_ids)
        if not voters:
            raise ChangeMembershipError("the new voter set is empty")
        missing = voters - set(self.effective_membership.membership.nodes)
        if missing:
            raise ChangeMembershipError(f"nodes {sorted(missing)} are not learners yet; add them with add_learner first")
        m = self._membership_for_change()
        old = m.configs[-1]
        if voters == old:
            return None
        behind = self.lagging(voters - old)
        if behind:
            err = ChangeMembershipError(f"new voters {sorted(behind)} have not caught up with the log yet "
                                        f"(entries behind the commit point: {behind}); retry once they have")
            err.lagging = behind  # Raft.change_membership waits and retries on this one
            raise err
        leaving = frozenset() if retain else frozenset(old - voters)
        new = Membership(configs=(old, voters), nodes=dict(m.nodes), leaving=leaving)
        return self._append_as_leader([(_MEMBERSHIP, new)])[0]

    def _membership_for_change(self) -> Membership:
        eff = self.effective_membership
        if log_index(eff.log_id) > log_index(self.committed) or eff.membership.is_joint:
            raise ChangeMembershipError("a membership change is already in progress")
        if self.committed is None or self.committed.term != self.vote.term:
            raise ChangeMembershipError("the leader has not committed an entry of its term yet; retry shortly")
        return eff.membership

    def read_index(self, token: Any) -> None:
        """Start a ReadIndex read; ``RespondRead(token, ...)`` follows.  Raises ForwardToLeader."""
        self._check_leader()
        if self.committed is None or self.committed.term != self.vote.term:
            self._reads_waiting_commit.append(token)  # no entry of this term committed yet
            return
        self._start_read(token)

    def _start_read(self, token: Any) -> None:
        self._pending_reads.append((token, self.committed, self._next_seq()))
        self._heartbeat_requested = True
        self._check_reads()

    def drop_reads(self) -> list:
        """Forget every read still waiting (the node is stopping); returns their tokens."""
        tokens = [t for t, _lid, _seq in self._pending_reads] + list(self._reads_waiting_commit)
        self._pending_reads, self._reads_waiting_commit = [], []
        return tokens

    def transfer_leader(self, target: int) -> None:
        """Hand leadership to ``target``: catch it up, then send TimeoutNow."""
        self._check_leader()
        if target == self.id:
            return
        if not self.effective_membership.membership.is_voter(target):
            raise ChangeMembershipError(f"node {target} is not a voter; it cannot lead")
        self.transferee = target  # no read lease while it lasts (read_lease); see _maybe_send_timeout_now
        self._transfer_deadline = self.now + self.cfg.election_timeout[1]
        self._maybe_send_timeout_now()
        self._dirty.add(target)

    def trigger_elect(self) -> None:
        if self.state != _LEADER and self.is_voter() and self._membership_durable():
            self._campaign(pre_vote=False, reason="trigger.elect() was called")

    def trigger_heartbeat(self) -> None:
        if self.state == _LEADER:
            self._heartbeat_requested = True

    def trigger_snapshot(self) -> bool:
        """Ask for a snapshot now; False if one is already being built."""
        if self._building_snapshot:
            return False
        self._building_snapshot = True
        self._emit(BuildSnapshot())
        return True

    def trigger_purge(self, upto_index: int) -> LogId | None:
        """Purge the log up to ``upto_index`` (clamped to the snapshot and in-flight replication)."""
        return self._maybe_purge(upto_index)

    # ------------------------------------------------------------------ log helpers

    def _append(self, entry: Entry) -> None:
        self.log.append(entry.log_id)
        if entry.kind == _MEMBERSHIP:
            self.memberships.append(StoredMembership(entry.log_id, entry.payload))
        self._emit(AppendToLog([entry]))

    def _append_batch(self, entries: Sequence[Entry]) -> None:
        """``_append`` each of ``entries`` (they continue the log), with one AppendToLog."""
        first, last = entries[0].log_id, entries[-1].log_id
        if first.term == last.term:
            self.log.append_run(first, last)
        else:
            for e in entries:
                self.log.append(e.log_id)
        membership = _MEMBERSHIP
        for e in entries:
            if e.kind == membership:
                self.memberships.append(StoredMembership(e.log_id, e.payload))
        self._emit(AppendToLog(list(entries)))

    def _append_as_leader(self, items: Sequence[tuple[EntryKind, Any]]) -> list[LogId]:
        out = []
        membership_changed = False
        for kind, payload in items:
            lid = LogId(self.vote.term, self.log.last_index + 1)
            self._append(Entry(lid, kind, payload))
            membership_changed |= kind == _MEMBERSHIP
            out.append(lid)
        if membership_changed:
            self._sync_progress()
            self._check_reads()  # a pending read may have its quorum in the new configuration
        self._dirty.update(self.progress)
        if not self.progress:
            self._maybe_commit()
        return out

    def _truncate(self, since: int) -> None:
        assert since > log_index(self.committed), f"truncating committed entries at {since} <= {self.committed}"
        self.log.truncate(since)
        self._emit(TruncateLog(since))
        while len(self.memberships) > 1 and log_index(self.memberships[-1].log_id) >= since:
            self.memberships.pop()
        if self.memberships and log_index(self.memberships[-1].log_id) >= since:
            self.memberships.pop()  # only an uncommitted initial membership can go this way
        if log_index(self.flushed) >= since:
            self.flushed = self.log.last
        self._pending_acks = [a for a in self._pending_acks if log_index(a[1]) < since]
        self._refresh_role()

    # ------------------------------------------------------------------ messages

    def step(self, from_id: int, msg: Any, token: Any = None) -> None:
        """Handle an incoming request (reply goes to ``token``) or response."""
        if from_id == self.id:
            return
        check_message(self, from_id, msg)  # RemoteProtocolError before anything changes
        if type(msg) is VoteRequest:
            self._note_log_of(msg.last_log_id)
        term = msg.term
        if term > self.vote.term:
            if isinstance(msg, VoteRequest):
                if msg.pre_vote:
                    pass  # a pre-vote never changes our state
                elif self._in_leader_lease() and not msg.transfer:
                    # CheckQuorum: while a leader is alive, a vote request does not disturb us
                    return self._reply_vote(msg, token, granted=False)
                else:
                    # Only a granted vote restarts the election timer (Figure 2), not the
                    # term of a request we may refuse: else candidates with stale logs
                    # (removed nodes, without PreVote) keep the up-to-date nodes from ever
                    # timing out, and nobody electable campaigns.
                    self._become_follower(term, None, reset_timer=False)
            elif isinstance(msg, VoteResponse) and msg.pre_vote and msg.granted:
                pass  # a granted pre-vote carries the term we would use
            else:
                leader = msg.leader_id if isinstance(msg, (AppendEntriesRequest, InstallSnapshotRequest,
                                                           TimeoutNowRequest)) else None
                self._become_follower(term, leader)
        elif term < self.vote.term:
            if isinstance(msg, AppendEntriesRequest):
                # Only the term of this refusal means something (the sender steps down).  It echoes
                # neither the heartbeat round nor the prev index: its sender may since have started
                # again and been elected in our very term, its round counter back at 0, and would
                # take the echo for an answer to its own round (a ReadIndex confirmed by nobody)
                # or for a log mismatch (issue 16).
                return self._emit(Respond(token, AppendEntriesResponse(self.vote.term, False)))
            if isinstance(msg, VoteRequest):
                return self._reply_vote(msg, token, granted=False)
            if isinstance(msg, InstallSnapshotRequest):
                return self._emit(Respond(token, InstallSnapshotResponse(self.vote.term)))
            if isinstance(msg, TimeoutNowRequest):
                return self._emit(Respond(token, TimeoutNowResponse(self.vote.term)))
            if not (isinstance(msg, VoteResponse) and msg.pre_vote):
                return  # a stale response
        self._HANDLERS[type(msg)](self, from_id, msg, token)

    # --- elections

    def _reply_vote(self, msg: VoteRequest, token: Any, granted: bool) -> None:
        term = msg.term if (granted and msg.pre_vote) else self.vote.term
        self._emit(Respond(token, VoteResponse(term, granted, msg.pre_vote, None if granted else self.log.last)))

    def _log_up_to_date(self, last: LogId | None) -> bool:
        mine = self.log.last
        if last is None:
            return mine is None
        return mine is None or last >= mine

    def _on_vote_request(self, from_id: int, msg: VoteRequest, token: Any) -> None:
        if msg.pre_vote:
            ok = (msg.term > self.vote.term
                  and (msg.transfer or not self._in_leader_lease())
                  and self._log_up_to_date(msg.last_log_id))
            return self._reply_vote(msg, token, ok)
        # msg.term == current term here (higher terms were adopted in step()).  A vote not yet given
        # in this term is not given while we follow its leader (etcd-raft's rule): that leader
        # holds a majority already, and a late or rejoining candidate of its term can only
        # disturb it.  Nor while the vote guard holds: a term learned from a stale reply clears
        # the leader, not what a read lease counts on (bar a transfer, as in step()).
        ok = ((self.vote.node_id == msg.candidate_id
               or (self.vote.node_id is None and self.leader_id is None
                   and (msg.transfer or not self._in_leader_lease())))
              and self.state != _LEADER
              and self._log_up_to_date(msg.last_log_id))
        if ok:
            # The vote is saved before the grant is sent (SaveVote precedes Respond).
            self._set_vote(Vote(self.vote.term, msg.candidate_id))
            self._reset_election_timer()
        self._reply_vote(msg, token, ok)

    def _on_vote_response(self, from_id: int, msg: VoteResponse, token: Any) -> None:
        if not msg.granted:
            return self._note_log_of(msg.last_log_id)
        if self.state != _CANDIDATE:
            return
        m = self.effective_membership.membership
        if msg.pre_vote:
            if not self._pre_vote_phase or msg.term != self.vote.term + 1:
                return
        elif self._pre_vote_phase or msg.term != self.vote.term:
            return
        self._granted.add(from_id)
        if m.is_quorum(self._granted & m.voter_ids):
            if self._pre_vote_phase:
                self._campaign(pre_vote=False)
            else:
                self._become_leader()

    def _on_timeout_now(self, from_id: int, msg: TimeoutNowRequest, token: Any) -> None:
        self._emit(Respond(token, TimeoutNowResponse(self.vote.term)))
        # The checks trigger_elect makes: a vote saved before our first configuration is on disk
        # could outlive it (see _membership_durable).
        if self.state != _LEADER and self.is_voter() and self._membership_durable():
            self._campaign(pre_vote=False, transfer=True,
                           reason=f"TimeoutNow from leader {from_id} (leadership transfer)")

    def _on_timeout_now_response(self, from_id: int, msg: TimeoutNowResponse, token: Any) -> None:
        pass  # only its term matters, handled in step()

    # --- replication, follower side

    def _accept_leader(self, leader_id: int) -> None:
        # A second leader of our term was refused in step() (refusals.check_message).
        if self.state == _CANDIDATE or self.leader_id != leader_id:
            self._become_follower(self.vote.term, leader_id)
        self._last_leader_contact = self.now
        self._vote_guard_until = max(self._vote_guard_until, self.now + self.cfg.election_timeout[0])
        self._last_leader_seen = leader_id
        self._log_behind = False  # the leader brings our log up to date
        self._reset_election_timer()

    def _on_append_entries(self, from_id: int, msg: AppendEntriesRequest, token: Any) -> None:
        self._accept_leader(msg.leader_id)
        prev_index = log_index(msg.prev_log_id)
        floor = max(log_index(self.committed), self.log.purged_index)
        if msg.prev_log_id is not None and prev_index > floor:  # (prev_index > 0: not None)
            mine = self.log.term_at(prev_index)
            if mine != msg.prev_log_id.term:
                # Reject with a hint: our last entry at or before prev whose
                # term is at most prev's term (fast backtracking).
                hint = min(prev_index, self.log.last_index)
                while hint > floor and (self.log.term_at(hint) or 0) > msg.prev_log_id.term:
                    hint -= 1
                resp = AppendEntriesResponse(self.vote.term, False, rejected=prev_index, hint_index=hint,
                                             hint_term=self.log.term_at(hint) or 0, seq=msg.seq)
                return self._emit(Respond(token, resp))
        # prev matches.  Append what is new; truncate only on a real conflict.
        ents = msg.entries
        if ents and ents[0].index == self.log.last_index + 1:
            self._append_batch(ents)  # the streaming case: all of them are new
            ents = ()
        for pos, e in enumerate(ents):
            if e.index <= floor:
                continue
            mine = self.log.term_at(e.index)
            if mine == e.term:
                continue
            if mine is not None:
                self._truncate(e.index)
            for e2 in msg.entries[pos:]:
                self._append(e2)
            break
        self._refresh_role()
        # Our log now matches the leader's up to the message's last entry
        # (entries at or below our commit point match by Log Matching).
        matched = msg.entries[-1].log_id if msg.entries else msg.prev_log_id
        new_commit = min(msg.leader_commit, log_index(matched))
        if new_commit > log_index(self.committed):
            commit = self.log.log_id_at(new_commit)
            assert commit is not None, "an index up to the matched entry, past the commit point, is in the log"
            self._set_committed(commit)
        self._pending_acks.append((token, matched, msg.seq, msg.term))
        self._flush_acks()

    def _flush_acks(self) -> None:
        """Send AppendEntries acks whose entries are durable (the rule: ack only what is on disk).

        Each ack carries the term of the request it answers, not our term when the
        flush completes: a reply speaks for the leader it answers.  Stamped with a
        later term, a late ack would tell the leader of that term that we hold
        entries of an earlier leader, which its own log may not have (issue 16).
        """
        if not self._pending_acks:
            return
        durable = log_index(self.flushed)
        keep = []
        for ack in self._pending_acks:
            token, matched, seq, term = ack
            if log_index(matched) <= durable:
                self._emit(Respond(token, AppendEntriesResponse(term, True, matched=matched, seq=seq)))
            else:
                keep.append(ack)
        self._pending_acks = keep

    def _on_install_snapshot(self, from_id: int, msg: InstallSnapshotRequest, token: Any) -> None:
        self._accept_leader(msg.leader_id)
        last = msg.meta.last_log_id
        if not msg.done:
            self._emit(ReceiveSnapshotChunk(msg))
            return self._emit(Respond(token, InstallSnapshotResponse(self.vote.term)))
        if log_index(last) <= log_index(self.committed):
            # Already have everything the snapshot holds.  Say so only as far as it is on our disk
            # (our commit point may run ahead of our flushes): the leader counts what we report as
            # held, and the rest is acknowledged once flushed, as appends are.
            held = last if log_index(last) <= log_index(self.flushed) else self.flushed
            return self._emit(Respond(token, InstallSnapshotResponse(self.vote.term, True, held)))
        if log_index(last) < self._installing:
            # An older snapshot (a late or duplicated message) than one already on its way
            # into the state machine: installing it after that one would take the state
            # machine back.  The newer install answers the leader.
            return
        self._installing = log_index(last)
        self._emit(ReceiveSnapshotChunk(msg))
        self._emit(InstallSnapshot(msg.meta, token))

    def on_snapshot_refused(self, meta: SnapshotMeta) -> None:
        """The state machine did not install ``meta``'s snapshot (a chunk went missing, or its
        content did not decode): another one, even an older one, may be installed now."""
        if log_index(meta.last_log_id) >= self._installing:
            self._installing = 0

    def on_snapshot_installed(self, meta: SnapshotMeta, token: Any) -> None:
        """The state machine now holds ``meta``'s snapshot: fix up the log and acknowledge.

        The acknowledgement carries our term now, which may be later than the
        request's (unlike an AppendEntries ack, see _flush_acks): what it
        reports is true for any leader, as the snapshot holds only committed
        entries and is on disk once installed.
        """
        last = meta.last_log_id
        if log_index(last) >= self._installing:
            self._installing = 0
        if last is None or log_index(last) <= log_index(self.committed):
            if token is not None:
                self._emit(Respond(token, InstallSnapshotResponse(self.vote.term, True, last)))
            return
        if self.log.term_at(last.index) not in (None, last.term):
            self._truncate(last.index)  # a conflicting (uncommitted) suffix
        self.log.purge(last)
        self._emit(PurgeLog(last))
        base = meta.last_membership
        later = [m for m in self.memberships[1:] if log_index(m.log_id) > last.index]
        self.memberships = ([base] if base is not None else self.memberships[:1]) + later
        if log_index(self.flushed) < last.index:
            self.flushed = last  # entries after it that we kept keep their flushed state
        self.snapshot = meta
        self.applied = last
        self._apply_submitted = last.index
        self._set_committed(last)
        self._refresh_role()
        if token is not None:
            self._emit(Respond(token, InstallSnapshotResponse(self.vote.term, True, last)))
        self._flush_acks()
        self._maybe_apply()

    # --- replication, leader side

    def _on_append_response(self, from_id: int, msg: AppendEntriesResponse, token: Any) -> None:
        if self.state != _LEADER or msg.term != self.vote.term:
            return
        p = self.progress.get(from_id)
        if p is None:
            return
        p.last_ack = self.now
        if msg.seq > p.acked_seq:
            p.acked_seq = msg.seq
        if msg.success:
            if p.maybe_update(msg.matched):
                self._maybe_commit()
                if from_id == self.transferee:
                    self._maybe_send_timeout_now()
        else:
            # Leader side of fast backtracking: the last index at or before the
            # hint whose term is at most the hint's term.
            k = min(msg.hint_index, self.log.last_index)
            while k > self.log.purged_index and (self.log.term_at(k) or 0) > msg.hint_term:
                k -= 1
            p.maybe_decrease_to(msg.rejected, k + 1)
        self._dirty.add(from_id)
        self._check_reads()
        f = self._farewell.get(from_id)
        if f is not None:
            self._maybe_end_farewell(from_id, f, msg)

    def _on_install_snapshot_response(self, from_id: int, msg: InstallSnapshotResponse, token: Any) -> None:
        if self.state != _LEADER or msg.term != self.vote.term:
            return
        p = self.progress.get(from_id)
        if p is None:
            return
        p.last_ack = self.now
        if msg.done:
            p.maybe_update(msg.last_log_id)
            p.become_probe()
            self._maybe_commit()
            self._dirty.add(from_id)

    def on_replication_failed(self, target: int) -> None:
        """Sending to ``target`` failed (unreachable, timed out, entries gone): probe again at the next heartbeat."""
        p = self.progress.get(target)
        if p is None or self.state != _LEADER:
            return
        p.become_probe()
        p.probe_sent = True  # wait for the next heartbeat round before retrying

    def _send_append(self, target: int) -> None:
        """Send ``target`` what it is missing, as its progress state allows."""
        p = self.progress.get(target)
        if p is None:
            return
        if p.state == _SNAPSHOT:
            return
        last = self.log.last_index
        if p.state == _PROBE:
            if p.probe_sent:
                return
        else:
            if p.next_index > last or len(p.inflight) >= self.cfg.max_inflight:
                return
        while True:
            prev_index = p.next_index - 1
            prev = self.log.log_id_at(prev_index)
            if prev_index < self.log.purged_index:
                # The entries after prev are purged (prev_index 0 included: a
                # pristine target behind a purged log): only a snapshot helps.
                return self._send_snapshot(target, p)
            end = min(last + 1, p.next_index + self.cfg.max_payload_entries)
            self._emit(Replicate(target, self.vote.term, prev, end, log_index(self.committed), self._seq))
            if p.state == _PROBE:
                p.probe_sent = True
                return
            p.next_index = end
            p.inflight.append((end - 1, self.now))
            if p.next_index > last or len(p.inflight) >= self.cfg.max_inflight:
                return

    def _send_snapshot(self, target: int, p: Progress) -> None:
        snap = self.snapshot
        if snap is None or log_index(snap.last_log_id) < self.log.purged_index:
            # The purged entries must be in a snapshot; wait for one.
            self.trigger_snapshot()
            p.probe_sent = True
            return
        p.become_snapshot(snap.last_log_id)
        self._emit(SendSnapshot(target, self.vote.term, snap))

    def _broadcast_heartbeat(self) -> None:
        """An AppendEntries to every target: probes in PROBE state, no entries otherwise.

        A heartbeat's prev is the target's matched entry, except in REPLICATE
        state when appends sent more than a heartbeat interval ago are still
        unacknowledged (see :meth:`_heartbeat_prev`).
        """
        commit = log_index(self.committed)
        if self.cfg.lease_reads:
            self._next_seq()  # each round renews the read lease
        for t, p in self.progress.items():
            if p.state == _PROBE:
                p.probe_sent = False
                self._dirty.add(t)
                continue
            if p.state == _REPLICATE and p.inflight and \
                    self.now - p.inflight[0][1] > self.cfg.rpc_timeout:
                # The last resort: an append unacknowledged for an rpc_timeout (the target
                # answers nothing, not even the heartbeats below).  Probing also stops
                # holding log purges back for it.
                p.become_probe()
                self._dirty.add(t)
                continue
            prev = self._heartbeat_prev(p)
            self._emit(Replicate(t, self.vote.term, prev, log_index(prev) + 1,
                                 min(commit, log_index(prev)), self._seq))

    def _heartbeat_prev(self, p: Progress) -> LogId | None:
        """The prev of a heartbeat: it asks whether the target holds what the leader streamed to it.

        An append unacknowledged for more than a heartbeat interval may be
        lost, and if it was the last one sent (or the target's rejection of
        the next one was lost too) nothing else would tell the leader before
        rpc_timeout.  The heartbeat then carries, as its prev, the last entry
        of the newest such append.  A target that lacks it rejects the
        heartbeat and the leader re-sends from the matched index at once
        (``Progress.maybe_decrease_to``: REPLICATE to PROBE); a target that
        has it acknowledges it (once it is on disk), which covers every older
        append, and nothing is sent again.  Younger appends are left alone:
        a normal round trip is not taken for a loss.

        Those entries are in the log: the leader purges no entry after a
        REPLICATE target's matched index while appends are in flight.
        """
        cutoff = self.now - self.cfg.heartbeat_interval
        upto = 0
        for end, sent in p.inflight:  # in the order sent
            if sent >= cutoff:
                break
            upto = end
        return self.log.log_id_at(upto) if upto else p.matched

    def _maybe_send_timeout_now(self) -> None:
        t = self.transferee
        if t is None:
            return
        p = self.progress.get(t)
        if p is not None and log_index(p.matched) == self.log.last_index:
            # The target campaigns with a transfer's pass through every vote guard: no read lease for
            # the rest of this term, even if the transfer times out (its election may still go on).
            self._lease_forfeit = True
            self._emit(SendTimeoutNow(t, TimeoutNowRequest(self.vote.term, self.id)))

    def _check_reads(self) -> None:
        if not self._pending_reads:
            return
        m = self.effective_membership.membership
        done = 0
        for token, read_log_id, seq in self._pending_reads:
            acked = {self.id} | {t for t, p in self.progress.items() if p.acked_seq >= seq}
            if not m.is_quorum(acked):
                break
            self._emit(RespondRead(token, read_log_id, True, self.id))
            done += 1
        if done:
            del self._pending_reads[:done]

    # ------------------------------------------------------------------ commit and apply

    def _maybe_commit(self) -> None:
        if self.state != _LEADER:
            return
        matched = {t: p.matched_index for t, p in self.progress.items()}
        matched[self.id] = log_index(self.flushed)
        n = self.effective_membership.membership.quorum_index(matched)
        # Only entries of the current term are committed by counting replicas.
        if n > log_index(self.committed) and self.log.term_at(n) == self.vote.term:
            self._set_committed(LogId(self.vote.term, n))

    def _set_committed(self, log_id: LogId) -> None:
        self.committed = log_id
        self._emit(SaveCommitted(log_id))
        if len(self.memberships) > 1 and log_index(self.memberships[1].log_id) <= log_id.index:
            before = self._replication_targets() if self.state == _LEADER else {}
            while len(self.memberships) > 1 and log_index(self.memberships[1].log_id) <= log_id.index:
                self.memberships.pop(0)
            if before:
                self._begin_farewells(before)
                self._sync_progress()
        self._maybe_apply()
        if self.state == _LEADER:
            self._on_commit_advanced()

    def _on_commit_advanced(self) -> None:
        if self._reads_waiting_commit and self.committed is not None and self.committed.term == self.vote.term:
            waiting, self._reads_waiting_commit = self._reads_waiting_commit, []
            for token in waiting:
                self._start_read(token)
        eff = self.effective_membership
        if log_index(eff.log_id) <= log_index(self.committed):
            if eff.membership.is_joint:
                self._append_as_leader([(_MEMBERSHIP, eff.membership.finalized())])
            elif not eff.membership.is_voter(self.id):
                # Removed from the cluster: hand over to the most up-to-date voter, then step down.
                best = max((t for t in self.progress if eff.membership.is_voter(t)),
                           key=lambda t: self.progress[t].matched_index, default=None)
                # (It has the whole log: the configuration is committed, and nothing was accepted
                # after it; the check keeps TimeoutNow for caught-up targets only, as transfers do.)
                if best is not None and self.progress[best].matched_index == self.log.last_index:
                    self._emit(SendTimeoutNow(best, TimeoutNowRequest(self.vote.term, self.id)))
                self._become_follower(self.vote.term, None)

    def _maybe_apply(self) -> None:
        upto = min(log_index(self.committed), log_index(self.flushed))
        if upto > self._apply_submitted:
            lid = self.log.log_id_at(upto)
            if lid is None:
                return
            self._apply_submitted = upto
            self._emit(Apply(lid))

    # ------------------------------------------------------------------ runtime notifications

    def on_log_flushed(self, log_id: LogId | None) -> None:
        """Entries up to ``log_id`` are durable."""
        idx = log_index(log_id)
        if idx <= log_index(self.flushed):
            return
        if log_id is not None and idx > self.log.purged_index and self.log.term_at(idx) != log_id.term:
            return  # that entry was truncated meanwhile; a later flush will report the new one
        self.flushed = log_id
        self._flush_acks()
        if self.state == _LEADER:
            self._maybe_commit()
        self._maybe_apply()

    def on_applied(self, log_id: LogId) -> None:
        """The state machine applied everything up to ``log_id``."""
        if log_index(log_id) <= log_index(self.applied):
            return
        self.applied = log_id
        self._maybe_snapshot_by_policy()

    def _maybe_snapshot_by_policy(self) -> None:
        """Build a snapshot once ``snapshot_every`` entries were applied since the last one."""
        every = self.cfg.snapshot_every
        if every is not None and not self._building_snapshot and \
                log_index(self.applied) - log_index(self.snapshot.last_log_id if self.snapshot else None) >= every:
            self.trigger_snapshot()

    def on_snapshot_built(self, meta: SnapshotMeta | None) -> None:
        """A snapshot build finished (None: it failed or there was nothing to snapshot)."""
        self._building_snapshot = False
        if meta is None:
            return
        if self.snapshot is None or log_index(meta.last_log_id) >= log_index(self.snapshot.last_log_id):
            self.snapshot = meta
        self._maybe_purge(log_index(meta.last_log_id) - self.cfg.max_in_snapshot_log_to_keep)
        # Entries applied while this one was being built may already call for the next.
        self._maybe_snapshot_by_policy()

    def _maybe_purge(self, upto: int) -> LogId | None:
        """Purge up to ``upto`` as far as allowed now; the rest is retried at later ticks (``_purge_wanted``)."""
        snap_index = log_index(self.snapshot.last_log_id) if self.snapshot else 0
        upto = min(upto, snap_index, log_index(self.applied))
        self._purge_wanted = max(self._purge_wanted, upto)
        if self.state == _LEADER:
            # Never purge entries a replication worker is streaming (those after a
            # target's matched index while messages are in flight): purging them
            # would force a snapshot on a follower that is catching up.  A probe
            # is not protected: if its entries are gone the worker reports it and
            # the target gets a snapshot; protecting probes would let one dead
            # follower stop log compaction for good.  An in-flight stream ends
            # (acknowledged, or found lost by a heartbeat, see _heartbeat_prev)
            # within a few heartbeat intervals, at the latest when it times out
            # after an rpc_timeout; then tick() retries the purge.
            for p in self.progress.values():
                if p.state == _REPLICATE and p.inflight:
                    upto = min(upto, p.matched_index)
        if upto <= self.log.purged_index:
            return None
        lid = self.log.log_id_at(upto)
        if lid is None:
            return None
        self.log.purge(lid)
        self._emit(PurgeLog(lid))
        return lid

    # ------------------------------------------------------------------ start-up

    def _startup_repairs(self) -> None:
        """Make the log agree with a state machine that got ahead of it (a snapshot installed just before a crash)."""
        a = self.applied
        if a is None or a.index <= self.log.purged_index:
            return
        t = self.log.term_at(a.index)
        if t == a.term:
            return
        if t is not None:
            self.log.truncate(a.index)
            self._emit(TruncateLog(a.index))
            self.memberships = [m for m in self.memberships if log_index(m.log_id) < a.index] or self.memberships[:1]
        self.log.purge(a)
        self._emit(PurgeLog(a))
        self.flushed = self.log.last
        if log_index(self.committed) < a.index:
            self.committed = a

    _HANDLERS: dict = {}


Engine._HANDLERS = {
    AppendEntriesRequest: Engine._on_append_entries,
    AppendEntriesResponse: Engine._on_append_response,
    VoteRequest: Engine._on_vote_request,
    VoteResponse: Engine._on_vote_response,
    InstallSnapshotRequest: Engine._on_install_snapshot,
    InstallSnapshotResponse: Engine._on_install_snapshot_response,
    TimeoutNowRequest: Engine._on_timeout_now,
    TimeoutNowResponse: Engine._on_timeout_now_response,
}


def _shared_address(nodes: Mapping[int, Node]) -> tuple[str, list[int]] | None:
    """An address that two members of ``nodes`` have, with their ids (sorted); None when all differ."""
    seen: dict[str, int] = {}
    for i in sorted(nodes):
        addr = nodes[i].addr
        if addr in seen:
            return addr, [seen[addr], i]
        seen[addr] = i
    return None
