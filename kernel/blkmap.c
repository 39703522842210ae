// SPDX-License-Identifier: GPL-2.0
/*
 * One bit per tracked block, stored sparsely: a leaf of DBD_BLKMAP_LEAF_BITS
 * bits (one index section's worth, 16 MiB of volume) exists only once a bit
 * in it was set.  Memory then follows what changed, not the volume: 8 bytes
 * of leaf pointer per 16 MiB (512 KiB per TiB), plus 512 bytes per 16 MiB
 * region written to.  A flat bitmap cost 32 MiB per TiB whatever changed.
 *
 * Readers are lockless and run in any context (the hook).  A leaf is
 * published with cmpxchg and never freed before the whole map, which its
 * owner frees only after no reader can see it (dbd_hook_sync or the COW
 * store's end), so no RCU is needed per leaf.
 *
 * A leaf that cannot be allocated where sleeping is not allowed may be made
 * "full" instead (dbd_blkmap_mark): every bit of it reads as set.  The change
 * bitmap uses that: a failed allocation costs precision (16 MiB reported
 * changed), never a lost change.
 */
#include <linux/slab.h>
#include <linux/vmalloc.h>
#include <linux/mm.h>
#include <linux/bitmap.h>
#include "dattobd.h"

#define DBD_BLKMAP_LEAF_BYTES (DBD_BLKMAP_LEAF_BITS / 8)
#define DBD_BLKMAP_FULL ((unsigned long *)1UL)	/* a leaf whose bits all read as set */

struct dbd_blkmap *dbd_blkmap_alloc(u64 nbits)
{
	struct dbd_blkmap *m = kzalloc(sizeof(*m), GFP_KERNEL);

	if (!m)
		return NULL;
	m->nbits = nbits;
	m->nleaves = max_t(u64, 1, DIV_ROUND_UP(nbits, DBD_BLKMAP_LEAF_BITS));
	/* vmalloc beyond a few pages, like the other per-volume arrays */
	m->leaves = m->nleaves * sizeof(*m->leaves) > 4 * PAGE_SIZE ?
			    vzalloc(m->nleaves * sizeof(*m->leaves)) :
			    kcalloc(m->nleaves, sizeof(*m->leaves), GFP_KERNEL);
	if (!m->leaves) {
		kfree(m);
		return NULL;
	}
	return m;
}

void dbd_blkmap_free(struct dbd_blkmap *m)
{
	u64 i;

	if (!m)
		return;
	for (i = 0; i < m->nleaves; i++)
		if (m->leaves[i] != DBD_BLKMAP_FULL)
			kfree(m->leaves[i]);
	kvfree(m->leaves);
	kfree(m);
}

static unsigned long *dbd_blkmap_leaf(const struct dbd_blkmap *m, u64 b)
{
	return READ_ONCE(m->leaves[b / DBD_BLKMAP_LEAF_BITS]);
}

/* the leaf of bit @b, allocated with @gfp if missing; NULL if that failed */
static unsigned long *dbd_blkmap_leaf_get(struct dbd_blkmap *m, u64 b, gfp_t gfp)
{
	unsigned long **slot = &m->leaves[b / DBD_BLKMAP_LEAF_BITS];
	unsigned long *leaf = READ_ONCE(*slot), *old;

	if (leaf)
		return leaf;
	leaf = kzalloc(DBD_BLKMAP_LEAF_BYTES, gfp | __GFP_NOWARN);
	if (!leaf)
		return NULL;
	old = cmpxchg(slot, NULL, leaf);
	if (old) {
		kfree(leaf);	/* another context published one first */
		return old;
	}
	atomic_long_inc(&m->nleaves_used);
	return leaf;
}

bool dbd_blkmap_test(const struct dbd_blkmap *m, u64 b)
{
	unsigned long *leaf;

	if (b >= m->nbits)
		return false;
	leaf = dbd_blkmap_leaf(m, b);
	if (!leaf)
		return false;
	return leaf == DBD_BLKMAP_FULL || test_bit(b % DBD_BLKMAP_LEAF_BITS, leaf);
}

int dbd_blkmap_set(struct dbd_blkmap *m, u64 b, gfp_t gfp)
{
	unsigned long *leaf;

	if (b >= m->nbits)
		return -ERANGE;
	leaf = dbd_blkmap_leaf_get(m, b, gfp);
	if (!leaf)
		return -ENOMEM;
	if (leaf != DBD_BLKMAP_FULL)
		set_bit(b % DBD_BLKMAP_LEAF_BITS, leaf);
	return 0;
}

/* make sure bit @b has a leaf, so that setting it later cannot fail */
int dbd_blkmap_reserve(struct dbd_blkmap *m, u64 b, gfp_t gfp)
{
	if (b >= m->nbits)
		return -ERANGE;
	return dbd_blkmap_leaf_get(m, b, gfp) ? 0 : -ENOMEM;
}

/*
 * Set bit @b and say whether it was clear.  Never fails: without memory the
 * bit's whole leaf becomes full (reported as "was clear" once, by the call
 * that made it full).
 */
bool dbd_blkmap_mark(struct dbd_blkmap *m, u64 b, gfp_t gfp)
{
	unsigned long **slot;
	unsigned long *leaf;

	if (b >= m->nbits)
		return false;
	leaf = dbd_blkmap_leaf_get(m, b, gfp);
	if (leaf == DBD_BLKMAP_FULL)
		return false;
	if (leaf)
		return !test_and_set_bit(b % DBD_BLKMAP_LEAF_BITS, leaf);
	slot = &m->leaves[b / DBD_BLKMAP_LEAF_BITS];
	if (cmpxchg(slot, NULL, DBD_BLKMAP_FULL) == NULL) {
		atomic_long_inc(&m->nleaves_full);
		return true;
	}
	return dbd_blkmap_mark(m, b, gfp);	/* someone published a leaf meanwhile */
}

void dbd_blkmap_clear(struct dbd_blkmap *m, u64 b)
{
	unsigned long *leaf;

	if (b >= m->nbits)
		return;
	leaf = dbd_blkmap_leaf(m, b);
	if (leaf && leaf != DBD_BLKMAP_FULL)
		clear_bit(b % DBD_BLKMAP_LEAF_BITS, leaf);
	/* a full leaf stays full: it only ever over-reports */
	WARN_ON_ONCE(leaf == DBD_BLKMAP_FULL);
}

/* the first set bit in [@b, @end), or @end; skips absent leaves in one step */
u64 dbd_blkmap_next(const struct dbd_blkmap *m, u64 b, u64 end)
{
	end = min(end, m->nbits);
	while (b < end) {
		u64 base = b - b % DBD_BLKMAP_LEAF_BITS;
		u64 lim = min_t(u64, end - base, DBD_BLKMAP_LEAF_BITS);
		unsigned long *leaf = dbd_blkmap_leaf(m, b);
		u64 i;

		if (leaf == DBD_BLKMAP_FULL)
			return b;
		if (leaf) {
			i = find_next_bit(leaf, lim, b - base);
			if (i < lim)
				return base + i;
		}
		b = base + DBD_BLKMAP_LEAF_BITS;
	}
	return end;
}

/* bits set in @a or in @b (either may be NULL), over the first @nbits bits */
u64 dbd_blkmap_weight_or(const struct dbd_blkmap *a, const struct dbd_blkmap *b, u64 nbits)
{
	u64 i, n = 0, nleaves = DIV_ROUND_UP(nbits, DBD_BLKMAP_LEAF_BITS);

	for (i = 0; i < nleaves; i++) {
		unsigned long *la = a && i < a->nleaves ? READ_ONCE(a->leaves[i]) : NULL;
		unsigned long *lb = b && i < b->nleaves ? READ_ONCE(b->leaves[i]) : NULL;
		u64 bits = min_t(u64, nbits - i * DBD_BLKMAP_LEAF_BITS, DBD_BLKMAP_LEAF_BITS);
		unsigned int w, words = BITS_TO_LONGS(bits);

		if (la == DBD_BLKMAP_FULL || lb == DBD_BLKMAP_FULL) {
			n += bits;
			continue;
		}
		if (!la && !lb)
			continue;
		for (w = 0; w < words; w++) {
			unsigned long x = (la ? la[w] : 0) | (lb ? lb[w] : 0);

			if (w == words - 1 && bits % BITS_PER_LONG)
				x &= BITMAP_LAST_WORD_MASK(bits);
			n += hweight_long(x);
		}
		cond_resched();
	}
	return n;
}

/* bytes of leaves: the part of the map that grows with what changed */
u64 dbd_blkmap_leaf_bytes(const struct dbd_blkmap *m)
{
	return m ? (u64)atomic_long_read(&m->nleaves_used) * DBD_BLKMAP_LEAF_BYTES : 0;
}
