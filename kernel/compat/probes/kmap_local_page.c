// SPDX-License-Identifier: GPL-2.0
/* kmap_local_page() (5.11+) */
#include <linux/highmem.h>
static __maybe_unused void dbd_probe(struct page *p) { void *a = kmap_local_page(p); kunmap_local(a); }
