// SPDX-License-Identifier: GPL-2.0
/* REQ_OP_WRITE_SAME exists (<= 5.17) */
#include <linux/blk_types.h>
static __maybe_unused int dbd_probe(void) { return REQ_OP_WRITE_SAME; }
