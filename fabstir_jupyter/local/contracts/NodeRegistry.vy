# pragma version ~=0.4.3
# pragma evm-version cancun
"""
@title NodeRegistry (local network)
@notice Hosts register here with a FAB stake, a metadata JSON string, an API URL
        and the models they serve, then price each model per payment token. Every
        function and event named as in the production NodeRegistry has its exact
        signature, outputs and selector (spec/production-abi.txt), so the same
        registration code runs here and on Base Sepolia:
        FAB approve, registerNode, stake (to add more), setModelTokenPricing.
@dev As in production: registerNode pulls MIN_STAKE of FAB (ERC-20) from the caller
     and unregisterNode returns the whole stake; a model's price is set per token
     (0x0 = native) and getModelPricing reverts where none is set (there is no
     fallback to the node's minimum prices, which are only recorded). Prices carry
     the precision factor 1000.
     Local differences: MIN_STAKE is a constructor argument (production: 1000 FAB);
     prices are not bounded; deactivateNode / reactivateNode (local only) take a
     node off the active list and back, keeping its stake.
"""

from ethereum.ercs import IERC20

interface ModelRegistry:
    def isModelApproved(modelId: bytes32) -> bool: view

MAX_NODES: constant(uint256) = 2048
MAX_NODE_MODELS: constant(uint256) = 32
MAX_METADATA: constant(uint256) = 2048
MAX_URL: constant(uint256) = 256

struct Node:
    operator: address  # empty for an unregistered address
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
    metadata: String[MAX_METADATA]
    models: DynArray[bytes32, MAX_NODE_MODELS]

event NodeUnregistered:
    operator: indexed(address)
    returnedAmount: uint256

event MetadataUpdated:
    operator: indexed(address)
    newMetadata: String[MAX_METADATA]

event ApiUrlUpdated:
    operator: indexed(address)
    newApiUrl: String[MAX_URL]

event ModelsUpdated:
    operator: indexed(address)
    newModels: DynArray[bytes32, MAX_NODE_MODELS]

event ModelTokenPricingUpdated:
    operator: indexed(address)
    modelId: indexed(bytes32)
    token: indexed(address)
    price: uint256

# local only: production has no deactivation
event NodeActivated:
    operator: indexed(address)
    active: bool

PRICE_PRECISION: public(constant(uint256)) = 1000

fabToken: public(immutable(address))
modelRegistry: public(immutable(address))
MIN_STAKE: public(immutable(uint256))

# operator, model, token (0x0 = native) -> price; 0 = not priced
modelTokenPricing: public(HashMap[address, HashMap[bytes32, HashMap[address, uint256]]])

nodes: HashMap[address, Node]
activeNodes: DynArray[address, MAX_NODES]
activeIndex: HashMap[address, uint256]  # position in activeNodes + 1; 0 = not listed
supports: HashMap[address, HashMap[bytes32, bool]]


@deploy
def __init__(fab_token: address, model_registry: address, minimum_stake: uint256):
    fabToken = fab_token
    modelRegistry = model_registry
    MIN_STAKE = minimum_stake


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


@internal
def _set_models(operator: address, modelIds: DynArray[bytes32, MAX_NODE_MODELS]):
    assert len(modelIds) > 0, "no models"
    self._clear_models(operator)
    for model_id: bytes32 in modelIds:
        assert not self.supports[operator][model_id], "duplicate model"
        assert staticcall ModelRegistry(modelRegistry).isModelApproved(model_id), "model not approved"
        self.supports[operator][model_id] = True
    self.nodes[operator].supportedModels = modelIds


@internal
def _pull_fab(sender: address, amount: uint256):
    assert extcall IERC20(fabToken).transferFrom(sender, self, amount, default_return_value=True), "stake transfer failed"


@internal
@view
def _registered(operator: address) -> bool:
    return self.nodes[operator].operator != empty(address)


@internal
def _set_price(modelId: bytes32, token: address, price: uint256):
    assert self._registered(msg.sender), "not registered"
    assert self.nodes[msg.sender].active, "node not active"
    assert self.supports[msg.sender][modelId], "model not supported"
    self.modelTokenPricing[msg.sender][modelId][token] = price
    log ModelTokenPricingUpdated(operator=msg.sender, modelId=modelId, token=token, price=price)


# -- registration (the caller is the node operator) --

@external
@nonreentrant
def registerNode(
    metadata: String[MAX_METADATA],
    apiUrl: String[MAX_URL],
    modelIds: DynArray[bytes32, MAX_NODE_MODELS],
    minPricePerTokenNative: uint256,
    minPricePerTokenStable: uint256,
):
    """
    @notice Register the caller as an active node, pulling MIN_STAKE of FAB from it
            (approve the registry first). Prices per model follow with setModelTokenPricing.
    """
    assert not self._registered(msg.sender), "already registered"
    assert len(metadata) > 0, "empty metadata"
    assert len(apiUrl) > 0, "empty apiUrl"
    self.nodes[msg.sender] = Node(
        operator=msg.sender,
        stakedAmount=MIN_STAKE,
        active=True,
        metadata=metadata,
        apiUrl=apiUrl,
        supportedModels=[],
        minPricePerTokenNative=minPricePerTokenNative,
        minPricePerTokenStable=minPricePerTokenStable,
    )
    self._set_models(msg.sender, modelIds)
    self._list(msg.sender)
    self._pull_fab(msg.sender, MIN_STAKE)
    log NodeRegistered(operator=msg.sender, stakedAmount=MIN_STAKE, metadata=metadata, models=modelIds)


@external
@nonreentrant
def stake(amount: uint256):
    """
    @notice Add `amount` FAB to the caller's stake (approve the registry first).
    """
    assert self._registered(msg.sender), "not registered"
    assert amount > 0, "zero amount"
    self.nodes[msg.sender].stakedAmount += amount
    self._pull_fab(msg.sender, amount)


@external
def updateMetadata(newMetadata: String[MAX_METADATA]):
    assert self._registered(msg.sender), "not registered"
    assert len(newMetadata) > 0, "empty metadata"
    self.nodes[msg.sender].metadata = newMetadata
    log MetadataUpdated(operator=msg.sender, newMetadata=newMetadata)


@external
def updateApiUrl(newApiUrl: String[MAX_URL]):
    assert self._registered(msg.sender), "not registered"
    assert len(newApiUrl) > 0, "empty apiUrl"
    self.nodes[msg.sender].apiUrl = newApiUrl
    log ApiUrlUpdated(operator=msg.sender, newApiUrl=newApiUrl)


@external
def updateSupportedModels(newModelIds: DynArray[bytes32, MAX_NODE_MODELS]):
    """
    @notice Replace the caller's models. Prices set for a model stay recorded.
    """
    assert self._registered(msg.sender), "not registered"
    self._set_models(msg.sender, newModelIds)
    log ModelsUpdated(operator=msg.sender, newModels=newModelIds)


@external
def setModelTokenPricing(modelId: bytes32, token: address, price: uint256):
    """
    @notice Set the caller's price for a model it serves, in `token` (0x0 = native);
            0 clears it.
    """
    self._set_price(modelId, token, price)


@external
def clearModelTokenPricing(modelId: bytes32, token: address):
    self._set_price(modelId, token, 0)


@external
def deactivateNode():
    """
    @notice Local only: take the caller off the active list (stake kept).
    """
    assert self.nodes[msg.sender].active, "not active"
    self.nodes[msg.sender].active = False
    self._unlist(msg.sender)
    log NodeActivated(operator=msg.sender, active=False)


@external
def reactivateNode():
    """
    @notice Local only: put a deactivated caller back on the active list.
    """
    assert self._registered(msg.sender), "not registered"
    assert not self.nodes[msg.sender].active, "already active"
    self.nodes[msg.sender].active = True
    self._list(msg.sender)
    log NodeActivated(operator=msg.sender, active=True)


@external
@nonreentrant
def unregisterNode():
    """
    @notice Remove the caller's node and return its whole FAB stake.
    """
    assert self._registered(msg.sender), "not registered"
    returned: uint256 = self.nodes[msg.sender].stakedAmount
    self._unlist(msg.sender)
    self._clear_models(msg.sender)
    self.nodes[msg.sender] = empty(Node)
    assert extcall IERC20(fabToken).transfer(msg.sender, returned, default_return_value=True), "stake transfer failed"
    log NodeUnregistered(operator=msg.sender, returnedAmount=returned)


# -- views --

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
    @notice Return (operator, stakedAmount, active, metadata, apiUrl, supportedModels,
            minPricePerTokenNative, minPricePerTokenStable); all empty if not registered.
    """
    n: Node = self.nodes[operator]
    return (
        n.operator, n.stakedAmount, n.active, n.metadata, n.apiUrl,
        n.supportedModels, n.minPricePerTokenNative, n.minPricePerTokenStable,
    )


@view
@external
def getNodeModels(operator: address) -> DynArray[bytes32, MAX_NODE_MODELS]:
    return self.nodes[operator].supportedModels


@view
@external
def getNodesForModel(modelId: bytes32) -> DynArray[address, MAX_NODES]:
    """
    @notice Return the active nodes serving the model.
    """
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
    @notice Return the node's price for a model in `token` (0x0 = native).
    @dev Reverts with "no model pricing" where none is set, as production does.
    """
    price: uint256 = self.modelTokenPricing[operator][modelId][token]
    assert price != 0, "no model pricing"
    return price


@view
@external
def getHostModelPrices(operator: address, token: address) -> (
    DynArray[bytes32, MAX_NODE_MODELS], DynArray[uint256, MAX_NODE_MODELS]
):
    """
    @notice Return the node's models and, in the same order, its price for each in
            `token` (0x0 = native); 0 where none is set. Empty if not registered.
    """
    model_ids: DynArray[bytes32, MAX_NODE_MODELS] = self.nodes[operator].supportedModels
    prices: DynArray[uint256, MAX_NODE_MODELS] = []
    for model_id: bytes32 in model_ids:
        prices.append(self.modelTokenPricing[operator][model_id][token])
    return model_ids, prices
