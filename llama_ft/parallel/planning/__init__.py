"""Planning: choose the fastest layout that fits, from specs of the model, the cluster and the recipe."""
