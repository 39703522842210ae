// SPDX-License-Identifier: GPL-2.0
/*
 * /proc/datto-info: the 0.12.1 JSON-like text, byte for byte, except that
 * '"' and '\' inside paths are escaped JSON-style and the footer is always
 * printed.
 */
#include <linux/proc_fs.h>
#include <linux/seq_file.h>
#include "dattobd.h"

static void dbd_seq_str(struct seq_file *m, const char *s)
{
	seq_putc(m, '"');
	for (; s && *s; s++) {
		if (*s == '"' || *s == '\\')
			seq_putc(m, '\\');
		seq_putc(m, *s);
	}
	seq_putc(m, '"');
}

static void dbd_show_tracer(struct seq_file *m, struct dbd_tracer *tr)
{
	struct cow_store *c = tr->cow;
	int err = dbd_tracer_error(tr);

	seq_puts(m, "\t\t{\n");
	seq_printf(m, "\t\t\t\"minor\": %u,\n", tr->minor);
	seq_puts(m, "\t\t\t\"cow_file\": ");
	dbd_seq_str(m, tr->cow_path);
	seq_puts(m, ",\n\t\t\t\"block_device\": ");
	dbd_seq_str(m, tr->bdev_path);
	seq_printf(m, ",\n\t\t\t\"max_cache\": %lu,\n", dbd_cache_size(tr));
	if (!(tr->state & DBD_STATE_UNVERIFIED) && c) {
		seq_printf(m, "\t\t\t\"fallocate\": %llu,\n", c->falloc_mib << 20);
		seq_printf(m, "\t\t\t\"cow_size_current\": %llu,\n", c->fsize);
		seq_printf(m, "\t\t\t\"seq_id\": %llu,\n", c->seqid);
		seq_printf(m, "\t\t\t\"uuid\": \"%16phN\",\n", c->uuid);
		if (c->version > 0) {
			seq_printf(m, "\t\t\t\"version\": %llu,\n", c->version);
			seq_printf(m, "\t\t\t\"nr_changed_blocks\": %llu,\n",
				   (u64)atomic64_read(&c->nr_changed));
		}
	}
	if (tr->ae_set) {
		seq_puts(m, "\t\t\t\"auto_expand\": {\n");
		seq_printf(m, "\t\t\t\t\"step_size_mib\": %llu,\n", tr->ae_step);
		seq_printf(m, "\t\t\t\t\"reserved_space_mib\": %llu\n", tr->ae_reserved);
		seq_puts(m, "\t\t\t},\n");
	}
	if (err)
		seq_printf(m, "\t\t\t\"error\": %d,\n", err);
	seq_printf(m, "\t\t\t\"state\": %lu\n", tr->state);
	seq_puts(m, "\t\t}");
}

static int dbd_proc_show(struct seq_file *m, void *v)
{
	unsigned int i;
	bool first = true;

	seq_puts(m, "{\n\t\"version\": \"" DBD_VERSION "\",\n\t\"devices\": [\n");
	mutex_lock(&dbd_ctl_mutex);
	for (i = 0; i < dbd_max_minors; i++) {
		struct dbd_tracer *tr = dbd_minors[i];

		if (!tr)
			continue;
		if (!first)
			seq_puts(m, ",\n");
		first = false;
		dbd_show_tracer(m, tr);
	}
	mutex_unlock(&dbd_ctl_mutex);
	seq_puts(m, "\n\t]\n}\n");
	return 0;
}

static int dbd_proc_open(struct inode *inode, struct file *f)
{
	return single_open(f, dbd_proc_show, NULL);
}

static const struct proc_ops dbd_proc_ops = {
	.proc_open = dbd_proc_open,
	.proc_read = seq_read,
	.proc_lseek = seq_lseek,
	.proc_release = single_release,
};

int dbd_proc_init(void)
{
	if (!proc_create("datto-info", 0444, NULL, &dbd_proc_ops))
		return -ENOMEM;
	return 0;
}

void dbd_proc_exit(void)
{
	remove_proc_entry("datto-info", NULL);
}
