/* SPDX-License-Identifier: GPL-2.0 */
#ifndef DATTOBD_H
#define DATTOBD_H

#include <linux/types.h>
#include <linux/bio.h>
#include <linux/kref.h>
#include <linux/mutex.h>
#include <linux/spinlock.h>
#include <linux/wait.h>
#include <linux/workqueue.h>
#include <linux/sched.h>
#include <linux/xarray.h>
#include "compat.h"
#include "dattobd_uapi.h"

#define DBD_VERSION "0.12.1"

#define LOG_DEBUG(fmt, ...) do { if (dbd_debug) pr_info("datto: " fmt "\n", ##__VA_ARGS__); } while (0)
#define LOG_INFO(fmt, ...) pr_info("datto: " fmt "\n", ##__VA_ARGS__)
#define LOG_WARN(fmt, ...) pr_warn("datto: " fmt "\n", ##__VA_ARGS__)
#define LOG_ERROR(err, fmt, ...) pr_err("datto: " fmt ": %d\n", ##__VA_ARGS__, (int)(err))

/* module parameters (main.c) */
extern int dbd_debug;
extern unsigned int dbd_max_minors;
extern unsigned long dbd_cow_max_memory_default;
extern unsigned int dbd_cow_fallocate_percentage_default;

/* ---- COW file ("exception store") ------------------------------------ */
#define COW_MAGIC 4776U
#define COW_CLEAN 1U
#define COW_INDEX_ONLY 2U
#define COW_BLOCK 4096ULL
#define COW_BLOCK_SECTS 8
#define COW_SECT_ENTRIES 4096ULL
#define COW_SECT_BYTES (COW_SECT_ENTRIES * 8)
#define COW_PENDING (1ULL << 63)	/* entry being preserved (in memory only) */

/*
 * Section map, in the header block after struct cow_header (upstream reads
 * only the struct).  The index area is preallocated, not written, so a
 * section the driver never wrote holds whatever the disk held before; bit g
 * says that sections [g * group, (g + 1) * group) hold their index content
 * at their place on the device, a clear bit that they are all zero.  A file
 * without the magic (upstream's, or one handed over to update-img) keeps its
 * index where a read through the filesystem finds it.
 */
#define COW_SMAP_OFF 64
#define COW_SMAP_MAGIC "DBDSMAP1"
#define COW_SMAP_HDR 16			/* magic, le32 group, le32 nbits */
#define COW_SMAP_BITS ((COW_BLOCK - COW_SMAP_OFF - COW_SMAP_HDR) * 8)

struct cow_header {
	u32 magic;
	u32 flags;
	u64 fpos;
	u64 fsize;
	u64 seqid;
	u8 uuid[16];
	u64 version;
	u64 nr_changed_blocks;
} __packed;

/* a run of the COW file mapped to the traced device, in 512-byte sectors */
struct dbd_extent {
	u64 fsect;	/* sector offset within the file */
	u64 dsect;	/* sector on the traced partition */
	u64 nr;
};

struct dbd_pin;

/* blkmap.c: one bit per block, leaves allocated as bits get set */
#define DBD_BLKMAP_LEAF_BITS COW_SECT_ENTRIES
struct dbd_blkmap {
	u64 nbits, nleaves;
	unsigned long **leaves;		/* NULL: all clear */
	atomic_long_t nleaves_used;	/* allocated leaves */
	atomic_long_t nleaves_full;	/* leaves set whole for want of memory */
};
struct dbd_blkmap *dbd_blkmap_alloc(u64 nbits);
void dbd_blkmap_free(struct dbd_blkmap *m);
bool dbd_blkmap_test(const struct dbd_blkmap *m, u64 b);
int dbd_blkmap_set(struct dbd_blkmap *m, u64 b, gfp_t gfp);
int dbd_blkmap_reserve(struct dbd_blkmap *m, u64 b, gfp_t gfp);
bool dbd_blkmap_mark(struct dbd_blkmap *m, u64 b, gfp_t gfp);
void dbd_blkmap_clear(struct dbd_blkmap *m, u64 b);
u64 dbd_blkmap_next(const struct dbd_blkmap *m, u64 b, u64 end);
u64 dbd_blkmap_weight_or(const struct dbd_blkmap *a, const struct dbd_blkmap *b, u64 nbits);
u64 dbd_blkmap_leaf_bytes(const struct dbd_blkmap *m);

struct cow_store {
	struct dbd_pin *pin;		/* holds the inode while mounted read-write */
	struct block_device *bdev;
	u64 nblocks, nsect, data_offset, first_data_block;
	u64 ntrack;		/* index entries in use: nblocks, +1 for a partial tail block */
	u64 fpos, fsize, alloc_len;
	u64 init_len;		/* alloc_len at creation; beyond it: expanded */
	u64 seqid, version;
	u8 uuid[16];
	atomic64_t nr_changed;
	u32 flags;
	u64 falloc_mib;
	/*
	 * The index cache (spec 4.6).  Sections are owned by the worker (or by
	 * whoever holds wlock with the worker paused): they are loaded from the
	 * file on demand and written back and freed when more than max_resident
	 * are in memory.  The hook never looks at them; it reads @mapped.
	 */
	u64 **sections;		/* resident sections; NULL: all-zero, or evicted (on_disk) */
	struct dbd_blkmap *mapped;	/* entry b is non-zero and final (not PENDING): lockless */
	unsigned long *on_disk;	/* section s was evicted: only the file's index holds it */
	unsigned long *dirty;	/* section s differs from the file's index */
	u32 *hits;		/* uses of section s since the last trim */
	unsigned long *valid;	/* section map: group g holds its content on the device */
	u64 group, ngroups;	/* sections per section-map bit, and the bits */
	u64 nresident;
	u64 max_resident;	/* from the tracer's cache size, see cow_set_cache() */
	u64 nr_evicted, nr_loaded;	/* for the debug log */
	struct mutex ext_mutex;		/* protects ext/dext/fsize against expand */
	struct dbd_extent *ext;		/* sorted by fsect */
	unsigned int n_ext;
	struct dbd_extent *dext;	/* sorted by dsect: file area as the snapshot sees it */
	unsigned int n_dext;
	void *hdr0;			/* first 4 KiB of the file at snapshot time */
	bool clean_on_disk;		/* header on disk says CLEAN (dormant) */
};

/* ---- tracer ------------------------------------------------------------ */
#define DBD_STATE_SNAPSHOT 1UL
#define DBD_STATE_ACTIVE 2UL
#define DBD_STATE_UNVERIFIED 4UL

enum dbd_hook_mode {
	DBD_HOOK_PASS = 0,	/* installed but writes pass untracked */
	DBD_HOOK_SNAP = 1,	/* copy-on-write */
	DBD_HOOK_INC = 2,	/* mark changed blocks */
	DBD_HOOK_PRE = 3,	/* unverified: remember writes until the file is loaded */
};

struct dbd_tracer {
	unsigned int minor;
	struct kref ref;
	unsigned long state;
	atomic_t error;
	bool dead;
	unsigned long cache_size;
	char *bdev_path;
	char *cow_path;

	struct dbd_bdev bh;
	struct block_device *bdev;
	sector_t nr_sects;
	u64 nblocks;		/* tracked blocks: cow_tracked_blocks() */

	struct cow_store *cow;
	struct dbd_blkmap *changed;	/* incremental changed-block bitmap */

	int hook_mode;
	bool hooked;

	struct gendisk *disk;
	bool disk_added;
	atomic_t open_count;

	struct task_struct *worker;
	bool worker_cow;		/* the worker preserves (snapshot): it has the rounds' pages */
	struct mutex wlock;		/* held by the worker while it processes a batch */
	spinlock_t qlock;
	struct bio_list writes;
	struct bio_list reads;
	wait_queue_head_t qwait;

	spinlock_t rlock;
	struct list_head rtrack;
	wait_queue_head_t rwait;

	bool ae_set;
	u64 ae_step, ae_reserved;
	unsigned long ae_running;	/* bit 0: expansion work queued/running */
	struct work_struct ae_work;
	wait_queue_head_t ae_wait;

	struct task_struct *expand_task;
	struct address_space *cow_mapping;	/* page cache of the active COW file */
	struct work_struct fail_work;
	bool fail_cleanup;

	struct super_block *tried_sb;	/* unverified: superblock of the last failed activation */
	struct xarray pre;		/* unverified snapshot: old data of blocks written early */
	unsigned long pre_count;
	bool pre_lost;			/* unverified snapshot: could not keep all early writes */
};

/* lifecycle.c */
int dbd_lifecycle_init(void);
void dbd_lifecycle_exit(void);
void dbd_lifecycle_kick(void);
void dbd_lifecycle_track(int delta);
void dbd_reconcile(void);
int dbd_pin_inode(struct inode *inode, struct dbd_pin **out);
void dbd_unpin(struct dbd_pin *p);
bool dbd_pin_alive(struct dbd_pin *p);
void dbd_pin_invalidate(struct dbd_pin *p);
struct file *dbd_open_in_fs(struct block_device *bdev, const char *bdev_path,
			    const char *relpath, int flags);
struct file *dbd_create_in_fs(struct block_device *bdev, const char *bdev_path,
			      const char *relpath);

/* ctl.c */
extern struct mutex dbd_ctl_mutex;
extern struct dbd_tracer **dbd_minors;
int dbd_ctl_init(void);
void dbd_ctl_exit(void);

/* tracer.c */
int dbd_setup_snap(unsigned int minor, const char *bdev, const char *cow,
		   unsigned long falloc_mib, unsigned long cache_size);
int dbd_reload(unsigned int minor, const char *bdev, const char *cow,
	       unsigned long cache_size, bool snap);
int dbd_destroy(unsigned int minor);
int dbd_transition_inc(unsigned int minor);
int dbd_transition_snap(unsigned int minor, const char *cow, unsigned long falloc_mib);
int dbd_reconfigure(unsigned int minor, unsigned long cache_size);
int dbd_expand(unsigned int minor, u64 size_mib);
int dbd_auto_expand(unsigned int minor, u64 step, u64 reserved);
void dbd_fill_info(struct dbd_tracer *tr, struct dattobd_info *info);
void dbd_destroy_all(void);
void dbd_tracer_fail(struct dbd_tracer *tr, int err);
int dbd_tracer_error(struct dbd_tracer *tr);
bool dbd_tracer_busy(struct dbd_tracer *tr);
unsigned long dbd_cache_size(struct dbd_tracer *tr);
void dbd_tracer_put(struct dbd_tracer *tr);
void dbd_go_dormant(struct dbd_tracer *tr);
void dbd_wake_dormant(struct dbd_tracer *tr);
void dbd_activate_unverified(struct dbd_tracer *tr);
extern struct workqueue_struct *dbd_wq;

/* hook.c */
int dbd_hook_init(void);
void dbd_hook_exit(void);
int dbd_hook_add(struct dbd_tracer *tr);
void dbd_hook_del(struct dbd_tracer *tr);
void dbd_hook_set_mode(struct dbd_tracer *tr, int mode);
dbd_qc_t dbd_submit_bio(struct bio *bio);
void dbd_hook_sync(void);
void dbd_snap_write_blocks(struct dbd_tracer *tr, sector_t sect, unsigned int nr_sects,
			   u64 *b0, u64 *b1);
void dbd_mark_changed(struct dbd_tracer *tr, u64 b0, u64 b1, gfp_t gfp);

/* cow_store.c */
struct dbd_io {
	atomic_t pending;
	int status;
	struct completion done;
	void (*done_fn)(struct dbd_io *io);	/* async completion instead of done */
};
struct dbd_bb {
	struct block_device *bdev;
	unsigned int opf;
	struct dbd_io *io;
	struct bio *bio;
	sector_t next;
};
void dbd_io_init(struct dbd_io *io);
int dbd_io_wait(struct dbd_io *io);
void dbd_io_put(struct dbd_io *io);
void dbd_bb_init(struct dbd_bb *bb, struct block_device *bdev, unsigned int opf, struct dbd_io *io);
void dbd_bb_add(struct dbd_bb *bb, sector_t sect, struct page *pg, unsigned int len, unsigned int off);
void dbd_bb_submit(struct dbd_bb *bb);
int cow_bb_add_file(struct cow_store *c, struct dbd_bb *bb, u64 foff, struct page *pg,
		    unsigned int off, unsigned int len);

struct cow_store *cow_create(struct block_device *bdev, sector_t nr_sects, const char *path,
			     u64 fsize, u64 falloc_mib, u64 seqid, const u8 *uuid, char **relpath,
			     int *errp);
struct cow_store *cow_load(struct block_device *bdev, sector_t nr_sects, struct file *f, bool snap,
			   unsigned long cache_bytes, int *errp);
int cow_same_layout(struct cow_store *c, struct file *f);
int cow_pin(struct cow_store *c, struct file *f);
void cow_unpin(struct cow_store *c);
bool cow_mapped(struct cow_store *c, u64 b);
u64 cow_entry_peek(struct cow_store *c, u64 b);
int cow_section_need(struct cow_store *c, u64 b);
int cow_entry_set(struct cow_store *c, u64 b, u64 v);
void cow_set_cache(struct cow_store *c, unsigned long bytes);
int cow_cache_trim(struct cow_store *c, u64 other_bytes);
int cow_finalize(struct cow_store *c, u32 flags, struct dbd_blkmap *changed);
int cow_handover(struct cow_store *c, struct dbd_blkmap *changed, struct file *f);
int cow_write_header(struct cow_store *c, u32 flags);
int cow_write_slots(struct cow_store *c, struct page **pages, unsigned int n, u64 fpos);
void cow_truncate_to_index(struct cow_store *c, struct file *f);
u64 cow_tracked_blocks(sector_t nr_sects);
unsigned long *cow_bitmap_alloc(u64 bits);
void cow_free(struct cow_store *c);
int cow_expand(struct dbd_tracer *tr, struct cow_store *c, struct file *f, u64 bytes);
bool cow_dev_region(struct cow_store *c, sector_t s, u64 *fsect);
void dbd_set_immutable(struct inode *inode, bool on);

/* worker (tracer.c) */
int dbd_start_worker(struct dbd_tracer *tr, bool snap);
void dbd_stop_worker(struct dbd_tracer *tr);

/* snapdev.c */
int dbd_snapdev_init(void);
void dbd_snapdev_exit(void);
int dbd_snapdev_create(struct dbd_tracer *tr);
int dbd_snapdev_add(struct dbd_tracer *tr);
void dbd_snapdev_destroy(struct dbd_tracer *tr);
void dbd_snapdev_process_read(struct dbd_tracer *tr, struct bio *bio);
bool dbd_rtrack_overlaps(struct dbd_tracer *tr, u64 b0, u64 b1);

/* proc.c */
int dbd_proc_init(void);
void dbd_proc_exit(void);

#endif
