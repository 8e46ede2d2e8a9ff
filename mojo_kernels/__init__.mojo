# MILI's Mojo kernels, registered as MAX custom ops (see each file's header for what it computes).
