"""CPU backend: ranks are processes, the node link is shared memory, the rail is gloo."""
