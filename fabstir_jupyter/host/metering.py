"""What a paid host owes the chain for one job: tokens streamed, and when to prove them (no I/O).

A :class:`JobMeter` counts the tokens a host streams for a job (on every session and request
bound to it), decides when a proof is due and how many tokens it claims, and refuses the next token
once the job's deposit could not pay for it. It follows the production node's cadence
(``checkpoint_manager.rs``, spec/PROTOCOL.md §10):

- a proof every :data:`PROOF_THRESHOLD` tokens (1000) while tokens stream;
- after each answer, a proof of what is pending when that is at least :data:`MIN_PROOF_TOKENS` (100);
- at settlement, a proof of whatever is pending, except a remainder under 100 tokens after an
  earlier proof (the contract refuses it, so those tokens go unbilled);
- the first proof of a job is padded up to the job's ``proofInterval`` (the contract's minimum
  billing: it refuses a smaller first proof).

A proof's size is fixed when it falls due, so a slow chain delays proofs but never changes them.
Padding claims tokens that were not streamed; the deposit bound accounts for it: the meter lets a
token through only if proving everything pending afterwards still stays within
``deposit × 1000 / pricePerToken``.

``proofHash`` is SHA-256 over a label, the job id, the chain total after the proof, the tokens it
claims and a running SHA-256 digest of the generated text: it names what was proven without
revealing it, and it is unique per job and total (the contract refuses a hash used before).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..errors import BudgetExceeded, FabstirError

__all__ = ["MIN_PROOF_TOKENS", "PROOF_THRESHOLD", "JobMeter", "Proof"]

#: Tokens between two proofs while an answer streams (production's CHECKPOINT_THRESHOLD).
PROOF_THRESHOLD = 1000
#: The fewest tokens the contract accepts in a proof (its MIN_PROVEN_TOKENS).
MIN_PROOF_TOKENS = 100
_LABEL = b"fabstir-host proof v1\x00"


@dataclass(frozen=True)
class Proof:
    """One ``submitProofOfWork`` a job owes.

    Attributes:
        job_id: the job.
        tokens: ``tokensClaimed``.
        total: the job's ``tokensUsed`` on chain once this proof (and every earlier one) is in.
        streamed: the tokens streamed for the job that this proof covers, in all.
        proof_hash: the 32-byte ``proofHash``.
        reason: why it is due: ``"threshold"``, ``"answer"`` or ``"settlement"``.
    """

    job_id: int
    tokens: int
    total: int
    streamed: int
    proof_hash: bytes
    reason: str


class JobMeter:
    """Count one job's streamed tokens and decide its proofs (production's cadence).

    Args:
        job_id: the job.
        proof_interval: the job's ``proofInterval`` (its first proof claims at least this many).
        max_tokens: the tokens its deposit pays for, ``deposit × 1000 // pricePerToken``.
        tokens_used: the job's ``tokensUsed`` on chain when the host took it (0 for a new job).
        threshold: tokens between two proofs while streaming.
    """

    def __init__(self, job_id: int, *, proof_interval: int, max_tokens: int, tokens_used: int = 0,
                 threshold: int = PROOF_THRESHOLD) -> None:
        self.job_id = job_id
        self.proof_interval = max(proof_interval, MIN_PROOF_TOKENS)
        self.max_tokens = max_tokens
        self.threshold = threshold
        self.streamed = 0  # tokens streamed for the job by this host
        self.proven = 0  # of those, the ones covered by a proof made so far
        self.tokens_used = tokens_used  # on chain when the host took the job
        self.claimed = tokens_used  # the chain total the proofs made so far add up to
        self.unbilled = 0  # tokens dropped at settlement (a remainder the contract would refuse)
        self.proofs = 0
        self.closed: FabstirError | None = None  # set when the job can take no more tokens
        self._digest = hashlib.sha256(job_id.to_bytes(32, "big"))

    def __repr__(self) -> str:
        return (f"<JobMeter job={self.job_id} streamed={self.streamed} proven={self.proven} "
                f"claimed={self.claimed}/{self.max_tokens}>")

    @property
    def pending(self) -> int:
        """Tokens streamed and not yet covered by a proof."""
        return self.streamed - self.proven

    @property
    def remaining(self) -> int:
        """Tokens the job may still stream: proving them and everything pending stays within the deposit."""
        return max(0, self.max_tokens - self.claimed - self.pending)

    def refusal(self) -> FabstirError | None:
        """Why the job can take no more tokens, or None while it can."""
        if self.closed is not None:
            return self.closed
        if self.remaining <= 0:
            return BudgetExceeded(f"job {self.job_id}: deposit exhausted after {self.claimed + self.pending} "
                                  f"billable tokens; open a new job to go on")
        return None

    def close(self, error: FabstirError) -> None:
        """Take no more tokens for this job; ``error`` says why to the next request."""
        if self.closed is None:
            self.closed = error

    def add_token(self, text: str) -> Proof | None:
        """Count one streamed token (``text``: its piece of the answer); return a proof if one falls due.

        The caller checks :meth:`refusal` first: the meter never refuses here.
        """
        self.streamed += 1
        if text:
            self._digest.update(text.encode("utf-8", "surrogatepass"))
        if self.pending >= self.threshold:
            return self._prove("threshold")
        return None

    def answer_ended(self) -> Proof | None:
        """An answer ended (however it ended): prove what is pending if it is at least 100 tokens."""
        if self.pending >= MIN_PROOF_TOKENS:
            return self._prove("answer")
        return None

    def settle(self) -> Proof | None:
        """The job's connection closed: the last proof, or None.

        Any pending token is proven when no proof exists yet (padded to the interval); after one, a
        remainder under 100 tokens cannot be proven and is counted in :attr:`unbilled`.
        """
        if self.pending <= 0:
            return None
        if self.claimed > 0 and self.pending < MIN_PROOF_TOKENS:
            self.unbilled += self.pending
            self.proven = self.streamed
            return None
        return self._prove("settlement")

    def _prove(self, reason: str) -> Proof:
        tokens = self.pending
        if self.claimed == 0:
            tokens = max(tokens, self.proof_interval)  # the contract's minimum first proof
        self.claimed += tokens
        self.proven = self.streamed
        self.proofs += 1
        digest = hashlib.sha256(_LABEL + self.job_id.to_bytes(32, "big") + self.claimed.to_bytes(32, "big")
                                + tokens.to_bytes(32, "big") + self._digest.copy().digest()).digest()
        return Proof(self.job_id, tokens, self.claimed, self.streamed, digest, reason)
