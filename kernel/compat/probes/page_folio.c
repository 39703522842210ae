// SPDX-License-Identifier: GPL-2.0
/* folios: page_folio() and folio->mapping (5.16+) */
#include <linux/mm.h>
#include <linux/pagemap.h>
static __maybe_unused struct address_space *dbd_probe(struct page *p) { return page_folio(p)->mapping; }
