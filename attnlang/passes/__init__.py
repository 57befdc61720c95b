"""The static planner's passes, one module each, in pipeline order (lower -> tiles -> candidates ->
classify -> closed forms); :func:`attnlang.planner.make_plan` runs them. Each pass is a pure
function of the IR, the layout and the tiles (:class:`attnlang.passes.tiles.Ctx` carries the
tiles and a per-plan cache); nothing here reads Q/K or imports the routing/pyramid oracles.
"""
