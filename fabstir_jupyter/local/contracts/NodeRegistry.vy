# pragma version ~=0.4.3
# pragma evm-version cancun
"""
@title NodeRegistry (local network)
@notice Hosts register here with a stake, a metadata JSON string, an API URL, the
        models they serve and their prices. The view functions have exactly the
        signatures of the production NodeRegistry (spec/PROTOCOL.md section 8).
@dev The stake is the native value sent with `registerNode` (or `addStake`),
     18 decimals like FAB, and is refunded by `unregisterNode`. Prices carry the
     precision factor 1000. A per-model price of 0 falls back to the node's minimum
     price for that token; token 0x0 is the native token, `stableToken` the other.
"""

interface ModelRegistry:
    def isActiveModel(modelId: bytes32) -> bool: view

MAX_NODES: constant(uint256) = 2048
MAX_NODE_MODELS: constant(uint256) = 32
MAX_METADATA: constant(uint256) = 2048
MAX_URL: constant(uint256) = 256

struct Node:
    stakedAmount: uint256
    active: bool
    metadata: String[MAX_METADATA]
    apiUrl: String[MAX_URL]
    supportedModels: DynArray[bytes32, MAX_NODE_MODELS]
    minPricePerTokenNative: uint256
    minPricePerTokenStable: uint256

event NodeRegistered:
    operator: indexed(address)
    stakedAmount: uint256
    apiUrl: String[MAX_URL]

event NodeUpdated:
    operator: indexed(address)

event NodeActivated:
    operator: indexed(address)
    active: bool

event NodeUnregistered:
    operator: indexed(address)
    refunded: uint256

event PricingUpdated:
    operator: indexed(address)
    modelId: indexed(bytes32)
    priceNative: uint256
    priceStable: uint256

modelRegistry: public(immutable(address))
stableToken: public(immutable(address))
minimumStake: public(immutable(uint256))

nodes: HashMap[address, Node]
activeNodes: DynArray[address, MAX_NODES]
activeIndex: HashMap[address, uint256]  # position in activeNodes + 1; 0 = not listed
supports: HashMap[address, HashMap[bytes32, bool]]
modelPrices: HashMap[address, HashMap[bytes32, HashMap[address, uint256]]]  # operator, model, token


@deploy
def __init__(model_registry: address, stable_token: address, minimum_stake: uint256):
    modelRegistry = model_registry
    stableToken = stable_token
    minimumStake = minimum_stake


# -- internal helpers --

@internal
def _list(operator: address):
    if self.activeIndex[operator] == 0:
        self.activeNodes.append(operator)
        self.activeIndex[operator] = len(self.activeNodes)


@internal
def _unlist(operator: address):
    position: uint256 = self.activeIndex[operator]
    if position == 0:
        return
    last: address = self.activeNodes.pop()
    if last != operator:
        self.activeNodes[position - 1] = last
        self.activeIndex[last] = position
    self.activeIndex[operator] = 0


@internal
def _clear_models(operator: address):
    for model_id: bytes32 in self.nodes[operator].supportedModels:
        self.supports[operator][model_id] = False
        self.modelPrices[operator][model_id][empty(address)] = 0
        self.modelPrices[operator][model_id][stableToken] = 0


@internal
def _set_models(operator: address, modelIds: DynArray[bytes32, MAX_NODE_MODELS]):
    self._clear_models(operator)
    for model_id: bytes32 in modelIds:
        assert not self.supports[operator][model_id], "duplicate model"
        assert staticcall ModelRegistry(modelRegistry).isActiveModel(model_id), "model not approved"
        self.supports[operator][model_id] = True
    self.nodes[operator].supportedModels = modelIds


@internal
def _set_price(operator: address, modelId: bytes32, priceNative: uint256, priceStable: uint256):
    assert self.supports[operator][modelId], "model not supported"
    self.modelPrices[operator][modelId][empty(address)] = priceNative
    self.modelPrices[operator][modelId][stableToken] = priceStable
    log PricingUpdated(operator=operator, modelId=modelId, priceNative=priceNative, priceStable=priceStable)


@internal
@view
def _registered(operator: address) -> bool:
    # a registered node always has an apiUrl
    return len(self.nodes[operator].apiUrl) > 0


# -- registration (the caller is the node operator) --

@external
@payable
def registerNode(
    metadata: String[MAX_METADATA],
    apiUrl: String[MAX_URL],
    modelIds: DynArray[bytes32, MAX_NODE_MODELS],
    minPricePerTokenNative: uint256,
    minPricePerTokenStable: uint256,
    modelPricesNative: DynArray[uint256, MAX_NODE_MODELS],
    modelPricesStable: DynArray[uint256, MAX_NODE_MODELS],
):
    """
    @notice Register the caller as an active node, staking the value sent.
    @dev The per-model price lists are empty or as long as `modelIds`.
    """
    assert not self._registered(msg.sender), "already registered"
    assert msg.value >= minimumStake, "stake below minimum"
    assert len(apiUrl) > 0, "empty apiUrl"
    assert len(modelPricesNative) == 0 or len(modelPricesNative) == len(modelIds), "price list length"
    assert len(modelPricesStable) == 0 or len(modelPricesStable) == len(modelIds), "price list length"
    self.nodes[msg.sender] = Node(
        stakedAmount=msg.value,
        active=True,
        metadata=metadata,
        apiUrl=apiUrl,
        supportedModels=[],
        minPricePerTokenNative=minPricePerTokenNative,
        minPricePerTokenStable=minPricePerTokenStable,
    )
    self._set_models(msg.sender, modelIds)
    for i: uint256 in range(len(modelIds), bound=MAX_NODE_MODELS):
        native: uint256 = 0
        stable: uint256 = 0
        if len(modelPricesNative) > 0:
            native = modelPricesNative[i]
        if len(modelPricesStable) > 0:
            stable = modelPricesStable[i]
        if native != 0 or stable != 0:
            self._set_price(msg.sender, modelIds[i], native, stable)
    self._list(msg.sender)
    log NodeRegistered(operator=msg.sender, stakedAmount=msg.value, apiUrl=apiUrl)


@external
def updateMetadata(metadata: String[MAX_METADATA]):
    assert self._registered(msg.sender), "not registered"
    self.nodes[msg.sender].metadata = metadata
    log NodeUpdated(operator=msg.sender)


@external
def updateApiUrl(apiUrl: String[MAX_URL]):
    assert self._registered(msg.sender), "not registered"
    assert len(apiUrl) > 0, "empty apiUrl"
    self.nodes[msg.sender].apiUrl = apiUrl
    log NodeUpdated(operator=msg.sender)


@external
def updateSupportedModels(modelIds: DynArray[bytes32, MAX_NODE_MODELS]):
    assert self._registered(msg.sender), "not registered"
    self._set_models(msg.sender, modelIds)
    log NodeUpdated(operator=msg.sender)


@external
def updatePricing(minPricePerTokenNative: uint256, minPricePerTokenStable: uint256):
    assert self._registered(msg.sender), "not registered"
    self.nodes[msg.sender].minPricePerTokenNative = minPricePerTokenNative
    self.nodes[msg.sender].minPricePerTokenStable = minPricePerTokenStable
    log NodeUpdated(operator=msg.sender)


@external
def setModelPricing(modelId: bytes32, priceNative: uint256, priceStable: uint256):
    """
    @notice Set the caller's price for one model it serves; 0 falls back to its minimum.
    """
    assert self._registered(msg.sender), "not registered"
    self._set_price(msg.sender, modelId, priceNative, priceStable)


@external
@payable
def addStake():
    assert self._registered(msg.sender), "not registered"
    self.nodes[msg.sender].stakedAmount += msg.value


@external
def deactivateNode():
    assert self.nodes[msg.sender].active, "not active"
    self.nodes[msg.sender].active = False
    self._unlist(msg.sender)
    log NodeActivated(operator=msg.sender, active=False)


@external
def reactivateNode():
    assert self._registered(msg.sender), "not registered"
    assert not self.nodes[msg.sender].active, "already active"
    self.nodes[msg.sender].active = True
    self._list(msg.sender)
    log NodeActivated(operator=msg.sender, active=True)


@external
@nonreentrant
def unregisterNode():
    """
    @notice Remove the caller's node and refund its stake.
    """
    assert self._registered(msg.sender), "not registered"
    refund: uint256 = self.nodes[msg.sender].stakedAmount
    self._unlist(msg.sender)
    self._clear_models(msg.sender)
    self.nodes[msg.sender] = empty(Node)
    send(msg.sender, refund)
    log NodeUnregistered(operator=msg.sender, refunded=refund)


# -- views with the production signatures --

@view
@external
def getAllActiveNodes() -> DynArray[address, MAX_NODES]:
    return self.activeNodes


@view
@external
def getNodeFullInfo(operator: address) -> (
    address, uint256, bool, String[MAX_METADATA], String[MAX_URL],
    DynArray[bytes32, MAX_NODE_MODELS], uint256, uint256
):
    """
    @notice Return (operator, stakedAmount, active, metadata, apiUrl,
            supportedModels, minPricePerTokenNative, minPricePerTokenStable).
    """
    n: Node = self.nodes[operator]
    if len(n.apiUrl) == 0:
        return empty(address), 0, False, "", "", [], 0, 0
    return (
        operator, n.stakedAmount, n.active, n.metadata, n.apiUrl,
        n.supportedModels, n.minPricePerTokenNative, n.minPricePerTokenStable,
    )


@view
@external
def getNodesForModel(modelId: bytes32) -> DynArray[address, MAX_NODES]:
    found: DynArray[address, MAX_NODES] = []
    for operator: address in self.activeNodes:
        if self.supports[operator][modelId]:
            found.append(operator)
    return found


@view
@external
def nodeSupportsModel(operator: address, modelId: bytes32) -> bool:
    return self.supports[operator][modelId]


@view
@external
def isActiveNode(operator: address) -> bool:
    return self.nodes[operator].active


@view
@external
def getNodeApiUrl(operator: address) -> String[MAX_URL]:
    return self.nodes[operator].apiUrl


@view
@external
def getModelPricing(operator: address, modelId: bytes32, token: address) -> uint256:
    """
    @notice Return the node's price for a model in a token (0x0 = native): its
            per-model price, else its minimum; 0 if it does not serve the model.
    @dev Reverts for a token other than native and stable.
    """
    assert token == empty(address) or token == stableToken, "unsupported token"
    # only a served model keeps a price (_clear_models zeroes the others): one read when set
    price: uint256 = self.modelPrices[operator][modelId][token]
    if price != 0:
        return price
    if not self.supports[operator][modelId]:
        return 0
    if token == empty(address):
        return self.nodes[operator].minPricePerTokenNative
    return self.nodes[operator].minPricePerTokenStable
