// SPDX-License-Identifier: GPL-2.0
/* blk_alloc_disk(struct queue_limits *, node) returning ERR_PTR (6.9+) */
#include <linux/blkdev.h>
static __maybe_unused struct gendisk * dbd_probe(void) { return blk_alloc_disk(NULL, NUMA_NO_NODE); }
