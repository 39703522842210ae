// SPDX-License-Identifier: GPL-2.0
/* blk_cleanup_queue() exists: a separately allocated queue must be cleaned up (<= 5.19) */
#include <linux/blkdev.h>
static __maybe_unused void dbd_probe(struct request_queue *q) { blk_cleanup_queue(q); }
