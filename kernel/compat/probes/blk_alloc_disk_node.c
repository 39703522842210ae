// SPDX-License-Identifier: GPL-2.0
/* blk_alloc_disk(node) returning NULL on failure (5.14 .. 6.8) */
#include <linux/blkdev.h>
static __maybe_unused struct gendisk * dbd_probe(void) { return blk_alloc_disk(NUMA_NO_NODE); }
