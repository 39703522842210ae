/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Every kernel-version difference lives here (and in compat.c).  The feature
 * macros come from compat/generated/probes.h, produced at build time by
 * compat/genprobes.sh from small compile probes (no LINUX_VERSION_CODE).
 */
#ifndef DBD_COMPAT_H
#define DBD_COMPAT_H

#include <linux/bio.h>
#include <linux/blkdev.h>
#include <linux/fs.h>
#include <linux/ftrace.h>
#include <linux/highmem.h>
#include <linux/mount.h>
#include <linux/mm.h>
#include <linux/pagemap.h>
#include "probes.h"

/* ---- submit_bio_noacct / block_device_operations.submit_bio ---------- */
#ifdef DBD_HAVE_SUBMIT_BIO_VOID
typedef void dbd_qc_t;
#define DBD_QC_RETURN(expr) do { expr; return; } while (0)
#define DBD_QC_NONE
#else
typedef blk_qc_t dbd_qc_t;
#define DBD_QC_RETURN(expr) return (expr)
#define DBD_QC_NONE BLK_QC_T_NONE
#endif

#ifdef DBD_HAVE_BDOPS_SUBMIT_BIO_VOID
typedef void dbd_mrf_t;
#define DBD_MRF_RETURN return
#else
typedef blk_qc_t dbd_mrf_t;
#define DBD_MRF_RETURN return BLK_QC_T_NONE
#endif

/* ---- which partition does a bio address ------------------------------ */
static inline bool dbd_bio_on_bdev(struct bio *bio, struct block_device *bdev)
{
#ifdef DBD_HAVE_BIO_BI_BDEV
	return bio->bi_bdev == bdev;
#else
	return bio->bi_disk == bdev->bd_disk && bio->bi_partno == bdev->bd_partno;
#endif
}

static inline struct gendisk *dbd_bio_disk(struct bio *bio)
{
#ifdef DBD_HAVE_BIO_BI_BDEV
	return bio->bi_bdev->bd_disk;
#else
	return bio->bi_disk;
#endif
}

static inline sector_t dbd_bdev_start(struct block_device *bdev)
{
	return get_start_sect(bdev);
}

/*
 * Sector of the bio relative to the start of @bdev (bio not yet remapped
 * in the common case; a remapped bio already carries absolute sectors).
 */
static inline sector_t dbd_bio_rel_sector(struct bio *bio, struct block_device *bdev)
{
#ifdef DBD_HAVE_BIO_REMAPPED
	if (bio_flagged(bio, BIO_REMAPPED))
		return bio->bi_iter.bi_sector - dbd_bdev_start(bdev);
#endif
	return bio->bi_iter.bi_sector;
}

static inline sector_t dbd_bdev_nr_sectors(struct block_device *bdev)
{
#ifdef DBD_HAVE_BDEV_NR_SECTORS
	return bdev_nr_sectors(bdev);
#else
	return i_size_read(bdev->bd_inode) >> 9;
#endif
}

static inline bool dbd_op_is_tracked_write(struct bio *bio)
{
	switch (bio_op(bio)) {
	case REQ_OP_WRITE:
		return bio_sectors(bio) != 0;
	case REQ_OP_WRITE_ZEROES:
	case REQ_OP_DISCARD:
	case REQ_OP_SECURE_ERASE:
#ifdef DBD_HAVE_REQ_OP_WRITE_SAME
	case REQ_OP_WRITE_SAME:
#endif
		return bio_sectors(bio) != 0;
	default:
		return false;
	}
}

/* ---- bio allocation -------------------------------------------------- */
static inline struct bio *dbd_bio_alloc(struct block_device *bdev, unsigned int nr,
					unsigned int opf, gfp_t gfp)
{
#ifdef DBD_HAVE_BIO_ALLOC_BDEV
	return bio_alloc(bdev, nr, opf, gfp);
#else
	struct bio *bio = bio_alloc(gfp, nr);

	if (bio) {
		bio_set_dev(bio, bdev);
		bio->bi_opf = opf;
	}
	return bio;
#endif
}

static inline void *dbd_kmap(struct page *p)
{
#ifdef DBD_HAVE_KMAP_LOCAL_PAGE
	return kmap_local_page(p);
#else
	return kmap_atomic(p);
#endif
}

static inline void dbd_kunmap(void *a)
{
#ifdef DBD_HAVE_KMAP_LOCAL_PAGE
	kunmap_local(a);
#else
	kunmap_atomic(a);
#endif
}

/* page cache mapping a data page belongs to (NULL/other for anon etc.) */
static inline struct address_space *dbd_page_mapping_raw(struct page *p)
{
#ifdef DBD_HAVE_PAGE_FOLIO
	return READ_ONCE(page_folio(p)->mapping);
#else
	return READ_ONCE(compound_head(p)->mapping);
#endif
}

/* ---- ftrace ---------------------------------------------------------- */
#ifdef DBD_HAVE_FTRACE_REGS_CB
typedef struct ftrace_regs dbd_fregs_t;
static inline struct pt_regs *dbd_fregs_pt(dbd_fregs_t *fr) { return ftrace_get_regs(fr); }
#else
typedef struct pt_regs dbd_fregs_t;
static inline struct pt_regs *dbd_fregs_pt(dbd_fregs_t *fr) { return fr; }
#endif

static inline void dbd_fregs_set_ip(dbd_fregs_t *fr, unsigned long ip)
{
#if defined(DBD_HAVE_FTRACE_REGS_SET_INSTRUCTION_POINTER)
	ftrace_regs_set_instruction_pointer(fr, ip);
#elif defined(DBD_HAVE_FTRACE_INSTRUCTION_POINTER_SET)
	ftrace_instruction_pointer_set(fr, ip);
#else
	fr->ip = ip;
#endif
}

#ifdef DBD_HAVE_FTRACE_FL_RECURSION
#define DBD_FTRACE_FL_RECURSION FTRACE_OPS_FL_RECURSION
#else
#define DBD_FTRACE_FL_RECURSION FTRACE_OPS_FL_RECURSION_SAFE
#endif

/* ---- opening a block device by path ---------------------------------- */
struct dbd_bdev {
	struct block_device *bdev;
#ifdef DBD_HAVE_BDEV_FILE_OPEN_BY_PATH
	struct file *file;
#endif
};

int dbd_bdev_open(const char *path, struct dbd_bdev *h);
void dbd_bdev_close(struct dbd_bdev *h);

/* superblock mounted on @bdev, or NULL (no reference taken) */
struct super_block *dbd_bdev_super(struct block_device *bdev);

/* freeze / thaw the filesystem on @bdev; fine when nothing is mounted */
struct dbd_freeze {
	struct super_block *sb;
	bool frozen;
};
int dbd_freeze(struct block_device *bdev, struct dbd_freeze *f);
void dbd_thaw(struct block_device *bdev, struct dbd_freeze *f);

/* ---- VFS -------------------------------------------------------------- */
int dbd_vfs_unlink(struct file *f);

/* open @name relative to the root of @mnt */
static inline struct file *dbd_file_open_root(struct vfsmount *mnt, const char *name, int flags,
					      umode_t mode)
{
#ifdef DBD_HAVE_FILE_OPEN_ROOT_PATH
	struct path root = { .mnt = mnt, .dentry = mnt->mnt_root };

	return file_open_root(&root, name, flags, mode);
#else
	return file_open_root(mnt->mnt_root, mnt, name, flags, mode);
#endif
}

/* exported everywhere, declared in a public header only from 6.6 */
#ifndef DBD_HAVE_VFS_PATH_LOOKUP_DECL
struct path;
struct vfsmount;
int vfs_path_lookup(struct dentry *dentry, struct vfsmount *mnt, const char *name,
		    unsigned int flags, struct path *path);
#endif

/* ---- gendisk -------------------------------------------------------- */
#define DBD_DISK_MAX_SECTORS 2048	/* 1 MiB snapshot reads */
/* ---- gendisk ----------------------------------------------------------- */
struct gendisk *dbd_alloc_disk(void);
int dbd_add_disk(struct gendisk *disk);
void dbd_free_disk(struct gendisk *disk, bool added);

#ifdef DBD_HAVE_GENHD_FL_NO_PART
#define DBD_GENHD_FL_NO_PART GENHD_FL_NO_PART
#else
#define DBD_GENHD_FL_NO_PART GENHD_FL_NO_PART_SCAN
#endif

#endif
