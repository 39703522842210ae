// SPDX-License-Identifier: GPL-2.0
/*
 * Write interception: an ftrace ops on the exported submit_bio_noacct()
 * that redirects writes to tracked partitions to dbd_submit_bio(), which has
 * the same prototype.  The callback is tiny and never redirects:
 *  - calls made from this module (our own I/O and our forwarding calls),
 *  - re-entries while current->bio_list is set (split/recursive submissions
 *    of a bio we already saw),
 *  - bios whose bi_end_io is one of ours,
 *  - reads and empty flushes.
 * dbd_submit_bio() never waits for I/O: it marks (incremental), forwards
 * (already preserved), or queues the bio for the COW worker.
 */
#include <linux/module.h>
#include <linux/rcupdate.h>
#include <linux/srcu.h>
#include <linux/slab.h>
#include "dattobd.h"

struct dbd_hook_entry {
	struct block_device *bdev;
	struct dbd_tracer *tr;
};

struct dbd_hook_list {
	struct rcu_head rcu;
	unsigned int n;
	struct dbd_hook_entry e[];
};

static struct dbd_hook_list __rcu *dbd_hooks;
DEFINE_STATIC_SRCU(dbd_srcu);
static atomic_t dbd_redirects = ATOMIC_INIT(0);
static DEFINE_MUTEX(dbd_hook_mutex);
static bool dbd_ftrace_registered;

static struct dbd_tracer *dbd_hook_lookup(struct bio *bio)
{
	struct dbd_hook_list *l = rcu_dereference(dbd_hooks);
	unsigned int i;

	if (!l)
		return NULL;
	for (i = 0; i < l->n; i++)
		if (dbd_bio_on_bdev(bio, l->e[i].bdev))
			return l->e[i].tr;
	return NULL;
}

/* block range [*b0, *b1] touched by sectors [sect, sect+nr) */
void dbd_snap_write_blocks(struct dbd_tracer *tr, sector_t sect, unsigned int nr_sects,
			   u64 *b0, u64 *b1)
{
	*b0 = sect / COW_BLOCK_SECTS;
	*b1 = (sect + max(nr_sects, 1U) - 1) / COW_BLOCK_SECTS;
	if (*b1 >= tr->nblocks)
		*b1 = tr->nblocks ? tr->nblocks - 1 : 0;
}

static bool dbd_all_preserved(struct dbd_tracer *tr, struct cow_store *c, u64 b0, u64 b1)
{
	u64 b;

	if (b0 >= tr->nblocks)
		return true;	/* partial tail block: not tracked */
	for (b = b0; b <= b1; b++)
		if (!cow_mapped(c, b))
			return false;
	return true;
}

/*
 * Mark blocks @b0..@b1 changed.  @gfp: GFP_NOWAIT from the hook, which
 * may not sleep; without memory a whole leaf is marked (dbd_blkmap_mark).
 */
void dbd_mark_changed(struct dbd_tracer *tr, u64 b0, u64 b1, gfp_t gfp)
{
	struct cow_store *c = READ_ONCE(tr->cow);
	struct dbd_blkmap *map = READ_ONCE(tr->changed);
	u64 b;

	if (!map || b0 >= tr->nblocks)
		return;
	b1 = min(b1, tr->nblocks - 1);	/* an untracked partial tail block has no bit */
	for (b = b0; b <= b1; b++) {
		if (dbd_blkmap_mark(map, b, gfp) && c && c->version >= 1 && !cow_mapped(c, b))
			atomic64_inc(&c->nr_changed);
	}
}

static dbd_qc_t dbd_forward(struct bio *bio)
{
	DBD_QC_RETURN(submit_bio_noacct(bio));
}

static dbd_qc_t dbd_handle(struct bio *bio)
{
	struct dbd_tracer *tr;
	int idx, mode;
	u64 b0, b1;
	unsigned long flags;

	idx = srcu_read_lock(&dbd_srcu);
	rcu_read_lock();
	tr = dbd_hook_lookup(bio);
	rcu_read_unlock();
	if (!tr || !dbd_op_is_tracked_write(bio))
		goto pass;
	mode = READ_ONCE(tr->hook_mode);
	if (mode == DBD_HOOK_PASS || READ_ONCE(tr->expand_task) == current)
		goto pass;
	dbd_snap_write_blocks(tr, dbd_bio_rel_sector(bio, tr->bdev), bio_sectors(bio), &b0, &b1);

	if (mode == DBD_HOOK_INC) {
		struct cow_store *c = READ_ONCE(tr->cow);

		/* dormant with a clean header: the worker dirties it first */
		if (!c || !READ_ONCE(c->clean_on_disk)) {
			dbd_mark_changed(tr, b0, b1, GFP_NOWAIT);
			goto pass;
		}
		goto queue;
	}
	if (mode == DBD_HOOK_PRE)
		goto queue;	/* unverified snapshot: old data kept in memory */

	/* snapshot mode */
	if (bio_has_data(bio) && READ_ONCE(tr->cow_mapping) &&
	    dbd_page_mapping_raw(bio_first_page_all(bio)) == READ_ONCE(tr->cow_mapping))
		goto pass;	/* writeback of our own (expanding) COW file */
	if (bio_op(bio) == REQ_OP_DISCARD) {
		/*
		 * A discard is only a hint.  Passing it down could change what
		 * the snapshot reads on thin/zeroing devices and copying its
		 * (possibly huge) range would exhaust the COW file, so while a
		 * snapshot exists discards are completed without effect.
		 */
		srcu_read_unlock(&dbd_srcu, idx);
		bio_endio(bio);
		return DBD_QC_NONE;
	}
	/*
	 * Rewrite fast path.  A snapshot read that was mapped to the origin
	 * before the block got preserved may still be in flight: then the
	 * worker must hold this write back too.
	 */
	if (dbd_all_preserved(tr, READ_ONCE(tr->cow), b0, b1) && !dbd_rtrack_overlaps(tr, b0, b1))
		goto pass;
queue:
	spin_lock_irqsave(&tr->qlock, flags);
	if (READ_ONCE(tr->hook_mode) == DBD_HOOK_PASS) {
		spin_unlock_irqrestore(&tr->qlock, flags);
		goto pass;
	}
	bio_list_add(&tr->writes, bio);
	spin_unlock_irqrestore(&tr->qlock, flags);
	wake_up(&tr->qwait);
	srcu_read_unlock(&dbd_srcu, idx);
	return DBD_QC_NONE;

pass:
	srcu_read_unlock(&dbd_srcu, idx);
	return dbd_forward(bio);
}

/* redirect target of the ftrace hook: same prototype as submit_bio_noacct */
dbd_qc_t notrace dbd_submit_bio(struct bio *bio)
{
#ifdef DBD_HAVE_SUBMIT_BIO_VOID
	dbd_handle(bio);
	atomic_dec(&dbd_redirects);
#else
	blk_qc_t r = dbd_handle(bio);

	atomic_dec(&dbd_redirects);
	return r;
#endif
}

static void notrace dbd_ftrace_cb(unsigned long ip, unsigned long parent_ip,
				  struct ftrace_ops *op, dbd_fregs_t *fregs)
{
	struct pt_regs *regs = dbd_fregs_pt(fregs);
	struct bio *bio;
	bool hit;

	if (!regs || within_module(parent_ip, THIS_MODULE) || current->bio_list)
		return;
	bio = (struct bio *)regs->di;	/* x86_64: first argument */
	if (!bio || !op_is_write(bio_op(bio)) || !bio_sectors(bio))
		return;
	rcu_read_lock();
	hit = dbd_hook_lookup(bio) != NULL;
	rcu_read_unlock();
	if (!hit)
		return;
	atomic_inc(&dbd_redirects);
	dbd_fregs_set_ip(fregs, (unsigned long)dbd_submit_bio);
}

static struct ftrace_ops dbd_ftrace_ops = {
	.func = dbd_ftrace_cb,
	.flags = FTRACE_OPS_FL_SAVE_REGS | FTRACE_OPS_FL_IPMODIFY | FTRACE_OPS_FL_PERMANENT |
		 DBD_FTRACE_FL_RECURSION,
};

int dbd_hook_init(void)
{
	unsigned long ip = (unsigned long)submit_bio_noacct;
	int err;

	err = ftrace_set_filter_ip(&dbd_ftrace_ops, ip, 0, 0);
	if (err) {
		LOG_ERROR(err, "error setting ftrace filter on submit_bio_noacct");
		return err;
	}
	err = register_ftrace_function(&dbd_ftrace_ops);
	if (err) {
		LOG_ERROR(err, "error registering ftrace hook on submit_bio_noacct");
		ftrace_set_filter_ip(&dbd_ftrace_ops, ip, 1, 0);
		return err;
	}
	dbd_ftrace_registered = true;
	return 0;
}

void dbd_hook_exit(void)
{
	if (!dbd_ftrace_registered)
		return;
	unregister_ftrace_function(&dbd_ftrace_ops);
	ftrace_set_filter_ip(&dbd_ftrace_ops, (unsigned long)submit_bio_noacct, 1, 0);
	dbd_ftrace_registered = false;
	synchronize_rcu();
	synchronize_srcu(&dbd_srcu);
	while (atomic_read(&dbd_redirects))
		schedule_timeout_uninterruptible(1);
	/*
	 * Every tracer is gone, but the list published by the last removal (empty)
	 * is still allocated; nothing can read it any more (found by kmemleak).
	 */
	kfree(rcu_dereference_protected(dbd_hooks, true));
	RCU_INIT_POINTER(dbd_hooks, NULL);
}

static int dbd_hook_publish(struct dbd_tracer *add, struct dbd_tracer *del)
{
	struct dbd_hook_list *old, *nl;
	unsigned int i, n = 0;

	mutex_lock(&dbd_hook_mutex);
	old = rcu_dereference_protected(dbd_hooks, lockdep_is_held(&dbd_hook_mutex));
	nl = kzalloc(struct_size(nl, e, (old ? old->n : 0) + 1), GFP_KERNEL);
	if (!nl) {
		mutex_unlock(&dbd_hook_mutex);
		return -ENOMEM;
	}
	for (i = 0; old && i < old->n; i++) {
		if (old->e[i].tr == del)
			continue;
		nl->e[n++] = old->e[i];
	}
	if (add) {
		nl->e[n].bdev = add->bdev;
		nl->e[n].tr = add;
		n++;
	}
	nl->n = n;
	rcu_assign_pointer(dbd_hooks, nl);
	mutex_unlock(&dbd_hook_mutex);
	synchronize_rcu();
	synchronize_srcu(&dbd_srcu);
	kfree(old);
	return 0;
}

int dbd_hook_add(struct dbd_tracer *tr)
{
	int err;

	if (tr->hooked)
		return 0;
	err = dbd_hook_publish(tr, NULL);
	if (!err)
		tr->hooked = true;
	return err;
}

void dbd_hook_del(struct dbd_tracer *tr)
{
	if (!tr->hooked)
		return;
	dbd_hook_set_mode(tr, DBD_HOOK_PASS);
	/* removing can only fail on ENOMEM; retry, the tracer must not stay listed */
	while (dbd_hook_publish(NULL, tr))
		schedule_timeout_uninterruptible(HZ / 10);
	tr->hooked = false;
}

void dbd_hook_set_mode(struct dbd_tracer *tr, int mode)
{
	unsigned long flags;

	spin_lock_irqsave(&tr->qlock, flags);
	WRITE_ONCE(tr->hook_mode, mode);
	spin_unlock_irqrestore(&tr->qlock, flags);
}

/* wait until no handler can still be using state read before a mode switch */
void dbd_hook_sync(void)
{
	synchronize_srcu(&dbd_srcu);
}
