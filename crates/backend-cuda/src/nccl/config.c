/* The options of a non-blocking NCCL communicator.
 *
 * NCCL wants its config struct initialised by the NCCL_CONFIG_INITIALIZER macro, whose fields
 * change between NCCL versions; expanding it here keeps its meaning without restating the fields
 * in Rust. Nothing here calls into libnccl (which the backend loads at run time): the struct is
 * only filled in. NCCL copies it during ncclCommInitRankConfig, reading as much of it as its own
 * version knows (the `size` field says how much there is).
 */
#include <nccl.h>

void pagoda_nccl_config_nonblocking(ncclConfig_t *config) {
    ncclConfig_t init = NCCL_CONFIG_INITIALIZER;
    /* Every NCCL call returns at once (ncclInProgress while it works in the background), so a
     * rank never blocks in NCCL waiting for a peer and the group can always be aborted. */
    init.blocking = 0;
    *config = init;
}
