# pragma version ~=0.4.3
# pragma evm-version cancun
"""
@title JobMarketplace (local network)
@notice Paid sessions (spec/PROTOCOL.md §10): a client deposits native funds or an
        accepted ERC-20 (USDC) into a job with a host and a model; the host proves the
        tokens it served; settlement pays the proven tokens (10% to the treasury, the
        rest to the host's HostEarnings balance) and refunds the rest of the deposit.
        Every function and event named as in the production JobMarketplace has its
        exact signature, outputs and selector (spec/production-abi.txt).
@dev The checks, their order and their revert texts follow production's
     JobMarketplaceWithModelsUpgradeable (post-audit, February 2026):
     - create: deposit >= MIN_DEPOSIT (native) or the token's minimum; price > 0;
       0 < maxDuration <= 365 days; 60 <= proofTimeoutWindow <= 3600; deposit <= the
       maximum (1000 ether native, the token's maximum); host registered and active;
       proofInterval >= 100 and deposit * 1000 / price >= proofInterval; model approved
       and served by the host; price >= NodeRegistry.getModelPricing(host, model, token),
       which reverts where the host has no price (production does the same: the create
       reverts with the registry's reason).
     - proof: host only, host still active, >= 100 tokens, the first proof >= proofInterval
       (minimum billing), at most 2000 tokens per second since the last proof (or the
       start), running total <= deposit * 1000 / price, each proofHash used once.
     - settle: cost = billable * price / 1000 (billable = tokensUsed, raised to
       proofInterval once a proof exists); treasury fee = cost * feeBasisPoints / 10000;
       the host's HostEarnings balance gets the rest; the depositor gets deposit - cost
       back (credited to its deposit balance if the transfer fails). Completion: the
       depositor at any time, the host once disputeWindow has passed since the last proof
       (or the start). Timeout: anyone, after maxDuration since the start or
       proofTimeoutWindow since the last proof.
     Local differences: no proxy, pause or delegation; the ProofSystem's replay check is
     done here (a proofHash is accepted once); the rate limit is production's default
     (2000 tokens/s) rather than a per-model value read from the ModelRegistry; the
     USDC address and the fee and dispute window are constructor arguments.
"""

from ethereum.ercs import IERC20

interface NodeRegistry:
    def getNodeFullInfo(operator: address) -> (
        address, uint256, bool, String[2048], String[256], DynArray[bytes32, 32], uint256, uint256
    ): view
    def nodeSupportsModel(operator: address, modelId: bytes32) -> bool: view
    def getModelPricing(operator: address, modelId: bytes32, token: address) -> uint256: view
    def isActiveNode(operator: address) -> bool: view
    def modelRegistry() -> address: view

interface ModelRegistry:
    def isModelApproved(modelId: bytes32) -> bool: view

interface HostEarnings:
    def creditEarnings(host: address, amount: uint256, token: address): nonpayable

MAX_CID: constant(uint256) = 512

# SessionStatus
ACTIVE: constant(uint8) = 0
COMPLETED: constant(uint8) = 1
TIMED_OUT: constant(uint8) = 2

MIN_DEPOSIT: public(constant(uint256)) = 10**14  # 0.0001 ether
MIN_PROVEN_TOKENS: public(constant(uint256)) = 100
DEFAULT_PROOF_TIMEOUT: public(constant(uint256)) = 300
MIN_PROOF_TIMEOUT: public(constant(uint256)) = 60
MAX_PROOF_TIMEOUT: public(constant(uint256)) = 3600
USDC_MIN_DEPOSIT: public(constant(uint256)) = 500_000  # 0.50 USDC
USDC_MAX_DEPOSIT: public(constant(uint256)) = 1_000_000 * 10**6
PRICE_PRECISION: public(constant(uint256)) = 1000
MAX_NATIVE_DEPOSIT: constant(uint256) = 1000 * 10**18
MAX_DURATION: constant(uint256) = 365 * 86400
MAX_TOKENS_PER_SECOND: constant(uint256) = 2000  # production's default per-model rate limit
MAX_MIN_TOKENS_FEE: constant(uint256) = 10000
MAX_FEE_BASIS_POINTS: constant(uint256) = 10000
MAX_DISPUTE_WINDOW: constant(uint256) = 7 * 86400

struct SessionJob:
    id: uint256
    depositor: address
    host: address
    paymentToken: address
    deposit: uint256
    pricePerToken: uint256
    tokensUsed: uint256
    maxDuration: uint256
    startTime: uint256
    lastProofTime: uint256
    proofInterval: uint256
    proofTimeoutWindow: uint256
    status: uint8
    withdrawnByHost: uint256
    refundedToUser: uint256
    conversationCID: String[MAX_CID]
    lastProofHash: bytes32
    lastProofCID: String[MAX_CID]

struct ProofSubmission:
    proofHash: bytes32
    tokensClaimed: uint256
    timestamp: uint256
    verified: bool
    deltaCID: String[MAX_CID]

event SessionJobCreated:
    jobId: indexed(uint256)
    depositor: indexed(address)
    host: indexed(address)
    deposit: uint256

event SessionJobCreatedForModel:
    jobId: indexed(uint256)
    depositor: indexed(address)
    host: indexed(address)
    modelId: bytes32
    deposit: uint256

event ProofSubmitted:
    jobId: indexed(uint256)
    host: indexed(address)
    tokensClaimed: uint256
    proofHash: bytes32
    proofCID: String[MAX_CID]
    deltaCID: String[MAX_CID]

event SessionCompleted:
    jobId: indexed(uint256)
    totalTokensUsed: uint256
    hostEarnings: uint256
    userRefund: uint256

event SessionCompletedBy:
    jobId: indexed(uint256)
    completedBy: indexed(address)
    tokensUsed: uint256
    paymentAmount: uint256
    refundAmount: uint256

event SessionTimedOut:
    jobId: indexed(uint256)
    hostEarnings: uint256
    userRefund: uint256

event RefundCreditedToDeposit:
    jobId: indexed(uint256)
    depositor: indexed(address)
    amount: uint256
    token: indexed(address)

event DepositReceived:
    depositor: indexed(address)
    amount: uint256
    token: indexed(address)

event WithdrawalProcessed:
    depositor: indexed(address)
    amount: uint256
    token: indexed(address)

event TreasuryWithdrawal:
    token: indexed(address)
    amount: uint256

event TokenAccepted:
    token: indexed(address)
    minDeposit: uint256
    maxDeposit: uint256

owner: public(address)
treasuryAddress: public(address)
usdcAddress: public(address)
nodeRegistry: public(address)
hostEarnings: public(address)
feeBasisPoints: public(uint256)
disputeWindow: public(uint256)
minTokensFee: public(uint256)
nextJobId: public(uint256)

acceptedTokens: public(HashMap[address, bool])
tokenMinDeposits: public(HashMap[address, uint256])
tokenMaxDeposits: public(HashMap[address, uint256])
accumulatedTreasuryNative: public(uint256)
accumulatedTreasuryTokens: public(HashMap[address, uint256])
userDepositsNative: public(HashMap[address, uint256])
userDepositsToken: public(HashMap[address, HashMap[address, uint256]])
sessionModel: public(HashMap[uint256, bytes32])

jobs: HashMap[uint256, SessionJob]
proofs: HashMap[uint256, HashMap[uint256, ProofSubmission]]  # job -> index -> proof
proofCount: HashMap[uint256, uint256]
usedProofHashes: HashMap[bytes32, bool]  # production's ProofSystem.markProofUsed


@deploy
def __init__(
    node_registry: address, host_earnings: address, fee_basis_points: uint256, dispute_window: uint256,
    usdc: address,
):
    assert node_registry != empty(address) and host_earnings != empty(address), "Zero addr"
    assert fee_basis_points <= MAX_FEE_BASIS_POINTS, "Bad fee"
    assert dispute_window > 0 and dispute_window <= MAX_DISPUTE_WINDOW, "Bad window"
    self.owner = msg.sender
    self.treasuryAddress = msg.sender
    self.nodeRegistry = node_registry
    self.hostEarnings = host_earnings
    self.feeBasisPoints = fee_basis_points
    self.disputeWindow = dispute_window
    self.nextJobId = 1
    if usdc != empty(address):
        self._accept_usdc(usdc)


@internal
def _accept_usdc(usdc: address):
    self.usdcAddress = usdc
    self.acceptedTokens[usdc] = True
    self.tokenMinDeposits[usdc] = USDC_MIN_DEPOSIT
    self.tokenMaxDeposits[usdc] = USDC_MAX_DEPOSIT


# -- administration (owner or treasury, as in production) --

@internal
@view
def _admin():
    assert msg.sender == self.treasuryAddress or msg.sender == self.owner, "Not admin"


@external
def setTreasury(treasury: address):
    assert msg.sender == self.owner, "not owner"
    assert treasury != empty(address), "Zero addr"
    self.treasuryAddress = treasury


@external
def setUsdcAddress(usdc: address):
    assert msg.sender == self.owner, "not owner"
    assert usdc != empty(address), "Zero addr"
    if self.usdcAddress != empty(address):
        self.acceptedTokens[self.usdcAddress] = False
    self._accept_usdc(usdc)


@external
def addAcceptedToken(token: address, minDeposit: uint256, maxDeposit: uint256):
    self._admin()
    assert not self.acceptedTokens[token], "Already set"
    assert minDeposit > 0, "Bad min"
    assert maxDeposit > minDeposit, "Max < min"
    assert token != empty(address), "Zero addr"
    self.acceptedTokens[token] = True
    self.tokenMinDeposits[token] = minDeposit
    self.tokenMaxDeposits[token] = maxDeposit
    log TokenAccepted(token=token, minDeposit=minDeposit, maxDeposit=maxDeposit)


@external
def setMinTokensFee(fee: uint256):
    """
    @notice Tokens charged when the depositor completes a job before any proof (default 0).
    """
    assert msg.sender == self.owner, "not owner"
    assert fee <= MAX_MIN_TOKENS_FEE, "Fee too high"
    self.minTokensFee = fee


# -- session creation --

@internal
@view
def _validate_session(
    host: address, token: address, deposit: uint256, pricePerToken: uint256, maxDuration: uint256,
    proofInterval: uint256, proofTimeoutWindow: uint256, modelId: bytes32,
):
    assert pricePerToken > 0, "Bad price"
    assert maxDuration > 0 and maxDuration <= MAX_DURATION, "Bad dur"
    assert proofInterval > 0, "Bad interval"
    assert proofTimeoutWindow >= MIN_PROOF_TIMEOUT and proofTimeoutWindow <= MAX_PROOF_TIMEOUT, "Bad timeout"
    assert host != empty(address), "No host"
    if token == empty(address):
        assert deposit <= MAX_NATIVE_DEPOSIT, "Over max"
    else:
        assert self.tokenMaxDeposits[token] > 0, "No max set"
        assert deposit <= self.tokenMaxDeposits[token], "Over max"

    # the host: registered and active
    operator: address = empty(address)
    staked: uint256 = 0
    active: bool = False
    metadata: String[2048] = ""
    api_url: String[256] = ""
    models: DynArray[bytes32, 32] = []
    min_native: uint256 = 0
    min_stable: uint256 = 0
    operator, staked, active, metadata, api_url, models, min_native, min_stable = staticcall NodeRegistry(
        self.nodeRegistry
    ).getNodeFullInfo(host)
    assert operator != empty(address), "No host reg"
    assert active, "Host not active"

    # the proof requirements: the deposit pays for at least one proof interval
    max_tokens: uint256 = deposit * PRICE_PRECISION // pricePerToken
    assert proofInterval >= MIN_PROVEN_TOKENS, "Low interval"
    assert max_tokens >= proofInterval, "Low deposit"

    # the model: approved, served by the host, priced at or below the offer
    model_registry: address = staticcall NodeRegistry(self.nodeRegistry).modelRegistry()
    assert staticcall ModelRegistry(model_registry).isModelApproved(modelId), "Bad model"
    assert staticcall NodeRegistry(self.nodeRegistry).nodeSupportsModel(host, modelId), "No model"
    host_price: uint256 = staticcall NodeRegistry(self.nodeRegistry).getModelPricing(host, modelId, token)
    assert pricePerToken >= host_price, "Low price"


@internal
def _open(
    host: address, modelId: bytes32, token: address, deposit: uint256, pricePerToken: uint256,
    maxDuration: uint256, proofInterval: uint256, proofTimeoutWindow: uint256,
) -> uint256:
    job_id: uint256 = self.nextJobId
    self.nextJobId = job_id + 1
    self.sessionModel[job_id] = modelId
    self.jobs[job_id] = SessionJob(
        id=job_id,
        depositor=msg.sender,
        host=host,
        paymentToken=token,
        deposit=deposit,
        pricePerToken=pricePerToken,
        tokensUsed=0,
        maxDuration=maxDuration,
        startTime=block.timestamp,
        lastProofTime=block.timestamp,
        proofInterval=proofInterval,
        proofTimeoutWindow=proofTimeoutWindow,
        status=ACTIVE,
        withdrawnByHost=0,
        refundedToUser=0,
        conversationCID="",
        lastProofHash=empty(bytes32),
        lastProofCID="",
    )
    log SessionJobCreated(jobId=job_id, depositor=msg.sender, host=host, deposit=deposit)
    log SessionJobCreatedForModel(jobId=job_id, depositor=msg.sender, host=host, modelId=modelId, deposit=deposit)
    return job_id


@external
@payable
@nonreentrant
def createSessionJobForModel(
    host: address, modelId: bytes32, pricePerToken: uint256, maxDuration: uint256, proofInterval: uint256,
    proofTimeoutWindow: uint256,
) -> uint256:
    """
    @notice Open a job paid in the native token; the value sent is the deposit.
    @return The job id (also in SessionJobCreated).
    """
    assert msg.value >= MIN_DEPOSIT, "Low deposit"
    self._validate_session(
        host, empty(address), msg.value, pricePerToken, maxDuration, proofInterval, proofTimeoutWindow, modelId
    )
    return self._open(
        host, modelId, empty(address), msg.value, pricePerToken, maxDuration, proofInterval, proofTimeoutWindow
    )


@external
@nonreentrant
def createSessionJobForModelWithToken(
    host: address, modelId: bytes32, token: address, deposit: uint256, pricePerToken: uint256,
    maxDuration: uint256, proofInterval: uint256, proofTimeoutWindow: uint256,
) -> uint256:
    """
    @notice Open a job paid in an accepted ERC-20 (approve `deposit` to this contract first).
    @return The job id (also in SessionJobCreated).
    """
    assert self.acceptedTokens[token], "Bad token"
    assert self.tokenMinDeposits[token] > 0, "Token not set"
    assert deposit >= self.tokenMinDeposits[token], "Low deposit"
    assert deposit > 0, "Zero deposit"
    self._validate_session(host, token, deposit, pricePerToken, maxDuration, proofInterval, proofTimeoutWindow, modelId)
    assert extcall IERC20(token).transferFrom(msg.sender, self, deposit, default_return_value=True), "transfer failed"
    return self._open(host, modelId, token, deposit, pricePerToken, maxDuration, proofInterval, proofTimeoutWindow)


# -- proofs --

@external
@nonreentrant
def submitProofOfWork(
    jobId: uint256, tokensClaimed: uint256, proofHash: bytes32, proofCID: String[MAX_CID], deltaCID: String[MAX_CID]
):
    """
    @notice The host claims `tokensClaimed` more tokens served in job `jobId`.
    """
    job: SessionJob = self.jobs[jobId]
    assert job.status == ACTIVE and job.id != 0, "Not active"
    assert msg.sender == job.host, "Not host"
    assert staticcall NodeRegistry(self.nodeRegistry).isActiveNode(job.host), "Host not active"
    assert tokensClaimed >= MIN_PROVEN_TOKENS, "Min tokens"
    if job.tokensUsed == 0:
        assert tokensClaimed >= job.proofInterval, "Low first"
    elapsed: uint256 = block.timestamp - job.lastProofTime
    assert tokensClaimed <= elapsed * MAX_TOKENS_PER_SECOND, "Too many"
    total: uint256 = job.tokensUsed + tokensClaimed
    assert total <= job.deposit * PRICE_PRECISION // job.pricePerToken, "Over dep"
    assert not self.usedProofHashes[proofHash], "Proof already used"
    self.usedProofHashes[proofHash] = True

    index: uint256 = self.proofCount[jobId]
    self.proofs[jobId][index] = ProofSubmission(
        proofHash=proofHash, tokensClaimed=tokensClaimed, timestamp=block.timestamp, verified=True, deltaCID=deltaCID
    )
    self.proofCount[jobId] = index + 1
    self.jobs[jobId].tokensUsed = total
    self.jobs[jobId].lastProofTime = block.timestamp
    self.jobs[jobId].lastProofHash = proofHash
    self.jobs[jobId].lastProofCID = proofCID
    log ProofSubmitted(
        jobId=jobId, host=msg.sender, tokensClaimed=tokensClaimed, proofHash=proofHash, proofCID=proofCID,
        deltaCID=deltaCID,
    )


# -- settlement --

@internal
def _settle(jobId: uint256, completedBy: address):
    job: SessionJob = self.jobs[jobId]
    proven: uint256 = self.proofCount[jobId]
    billable: uint256 = job.tokensUsed
    if billable < job.proofInterval and proven > 0:
        billable = job.proofInterval  # minimum billing, as production
    host_payment: uint256 = billable * job.pricePerToken // PRICE_PRECISION
    early_fee: uint256 = 0
    if completedBy == job.depositor and job.status == COMPLETED and proven == 0 and self.minTokensFee > 0:
        early_fee = self.minTokensFee * job.pricePerToken // PRICE_PRECISION
        if host_payment >= job.deposit:
            early_fee = 0
        elif early_fee > job.deposit - host_payment:
            early_fee = job.deposit - host_payment
    host_total: uint256 = host_payment + early_fee
    refund: uint256 = 0
    if job.deposit > host_total:
        refund = job.deposit - host_total

    if host_total > 0:
        treasury_fee: uint256 = host_payment * self.feeBasisPoints // 10000  # not on the early fee
        net: uint256 = host_total - treasury_fee
        if job.paymentToken == empty(address):
            self.accumulatedTreasuryNative += treasury_fee
            raw_call(self.hostEarnings, b"", value=net)
        else:
            self.accumulatedTreasuryTokens[job.paymentToken] += treasury_fee
            assert extcall IERC20(job.paymentToken).transfer(
                self.hostEarnings, net, default_return_value=True
            ), "transfer failed"
        extcall HostEarnings(self.hostEarnings).creditEarnings(job.host, net, job.paymentToken)
        self.jobs[jobId].withdrawnByHost = net

    if refund > 0:
        self.jobs[jobId].refundedToUser = refund
        sent: bool = False
        if job.paymentToken == empty(address):
            sent = raw_call(job.depositor, b"", value=refund, revert_on_failure=False)
        else:
            ok: bool = False
            answer: Bytes[32] = b""
            ok, answer = raw_call(
                job.paymentToken,
                abi_encode(job.depositor, refund, method_id=method_id("transfer(address,uint256)")),
                max_outsize=32,
                revert_on_failure=False,
            )
            sent = ok and (len(answer) == 0 or convert(extract32(answer, 0), uint256) != 0)
        if not sent:
            # pull pattern: the depositor withdraws it later
            if job.paymentToken == empty(address):
                self.userDepositsNative[job.depositor] += refund
            else:
                self.userDepositsToken[job.depositor][job.paymentToken] += refund
            log RefundCreditedToDeposit(jobId=jobId, depositor=job.depositor, amount=refund, token=job.paymentToken)

    log SessionCompleted(
        jobId=jobId, totalTokensUsed=job.tokensUsed, hostEarnings=self.jobs[jobId].withdrawnByHost, userRefund=refund
    )
    log SessionCompletedBy(
        jobId=jobId, completedBy=completedBy, tokensUsed=job.tokensUsed, paymentAmount=host_payment,
        refundAmount=refund,
    )


@external
@nonreentrant
def completeSessionJob(jobId: uint256, conversationCID: String[MAX_CID]):
    """
    @notice Settle job `jobId`: by its depositor at any time, by its host once the dispute
            window has passed since the last proof (or the start).
    """
    job: SessionJob = self.jobs[jobId]
    assert job.status == ACTIVE and job.id != 0, "Not active"
    assert msg.sender == job.depositor or msg.sender == job.host, "Not depositor or host"
    if msg.sender != job.depositor:
        assert block.timestamp >= job.lastProofTime + self.disputeWindow, "Dispute wait"
    self.jobs[jobId].status = COMPLETED
    self.jobs[jobId].conversationCID = conversationCID
    self._settle(jobId, msg.sender)


@external
@nonreentrant
def triggerSessionTimeout(jobId: uint256):
    """
    @notice Settle job `jobId` as timed out; anyone may, after maxDuration since the start
            or proofTimeoutWindow since the last proof.
    """
    job: SessionJob = self.jobs[jobId]
    assert job.status == ACTIVE and job.id != 0, "Not active"
    window: uint256 = job.proofTimeoutWindow
    if window == 0:
        window = DEFAULT_PROOF_TIMEOUT
    timed_out: bool = block.timestamp > job.startTime + job.maxDuration or block.timestamp > job.lastProofTime + window
    assert timed_out, "Not timeout"
    self.jobs[jobId].status = TIMED_OUT
    self._settle(jobId, msg.sender)
    log SessionTimedOut(
        jobId=jobId, hostEarnings=self.jobs[jobId].withdrawnByHost, userRefund=self.jobs[jobId].refundedToUser
    )


# -- deposit balances (refunds that could not be sent land here) --

@external
@payable
def depositNative():
    assert msg.value > 0, "Zero deposit"
    self.userDepositsNative[msg.sender] += msg.value
    log DepositReceived(depositor=msg.sender, amount=msg.value, token=empty(address))


@external
@nonreentrant
def depositToken(token: address, amount: uint256):
    assert amount > 0, "Zero deposit"
    assert token != empty(address) and self.acceptedTokens[token], "Bad token"
    assert extcall IERC20(token).transferFrom(msg.sender, self, amount, default_return_value=True), "transfer failed"
    self.userDepositsToken[msg.sender][token] += amount
    log DepositReceived(depositor=msg.sender, amount=amount, token=token)


@external
@nonreentrant
def withdrawNative(amount: uint256):
    assert self.userDepositsNative[msg.sender] >= amount, "Low balance"
    self.userDepositsNative[msg.sender] -= amount
    raw_call(msg.sender, b"", value=amount)
    log WithdrawalProcessed(depositor=msg.sender, amount=amount, token=empty(address))


@external
@nonreentrant
def withdrawToken(token: address, amount: uint256):
    assert self.userDepositsToken[msg.sender][token] >= amount, "Low balance"
    self.userDepositsToken[msg.sender][token] -= amount
    assert extcall IERC20(token).transfer(msg.sender, amount, default_return_value=True), "transfer failed"
    log WithdrawalProcessed(depositor=msg.sender, amount=amount, token=token)


@view
@external
def getDepositBalance(account: address, token: address) -> uint256:
    if token == empty(address):
        return self.userDepositsNative[account]
    return self.userDepositsToken[account][token]


# -- treasury --

@external
@nonreentrant
def withdrawTreasuryNative():
    assert msg.sender == self.treasuryAddress, "Only treasury"
    amount: uint256 = self.accumulatedTreasuryNative
    assert amount > 0, "No balance"
    self.accumulatedTreasuryNative = 0
    raw_call(self.treasuryAddress, b"", value=amount)
    log TreasuryWithdrawal(token=empty(address), amount=amount)


@external
@nonreentrant
def withdrawTreasuryTokens(token: address):
    assert msg.sender == self.treasuryAddress, "Only treasury"
    amount: uint256 = self.accumulatedTreasuryTokens[token]
    assert amount > 0, "No tokens"
    self.accumulatedTreasuryTokens[token] = 0
    assert extcall IERC20(token).transfer(self.treasuryAddress, amount, default_return_value=True), "transfer failed"
    log TreasuryWithdrawal(token=token, amount=amount)


# -- views --

@view
@external
def sessionJobs(jobId: uint256) -> (
    uint256, address, address, address, uint256, uint256, uint256, uint256, uint256, uint256, uint256, uint256,
    uint8, uint256, uint256, String[MAX_CID], bytes32, String[MAX_CID]
):
    """
    @notice Return the job's 18 fields, flat, in production's order: id, depositor, host,
            paymentToken, deposit, pricePerToken, tokensUsed, maxDuration, startTime,
            lastProofTime, proofInterval, proofTimeoutWindow, status (0 Active, 1 Completed,
            2 TimedOut), withdrawnByHost, refundedToUser, conversationCID, lastProofHash,
            lastProofCID. All zero for an unknown id.
    """
    j: SessionJob = self.jobs[jobId]
    return (
        j.id, j.depositor, j.host, j.paymentToken, j.deposit, j.pricePerToken, j.tokensUsed, j.maxDuration,
        j.startTime, j.lastProofTime, j.proofInterval, j.proofTimeoutWindow, j.status, j.withdrawnByHost,
        j.refundedToUser, j.conversationCID, j.lastProofHash, j.lastProofCID,
    )


@view
@external
def getProofSubmission(sessionId: uint256, proofIndex: uint256) -> (bytes32, uint256, uint256, bool, String[MAX_CID]):
    """
    @notice Return proof `proofIndex` of a job: (proofHash, tokensClaimed, timestamp, verified, deltaCID).
    """
    assert proofIndex < self.proofCount[sessionId], "Bad index"
    p: ProofSubmission = self.proofs[sessionId][proofIndex]
    return p.proofHash, p.tokensClaimed, p.timestamp, p.verified, p.deltaCID
