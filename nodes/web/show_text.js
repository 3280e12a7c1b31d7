// Shows the text a QuantKit node reports (ui.text) in a read-only box on the node, in the
// classic canvas and in Vue node mode ("Nodes 2.0").
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const WIDGET = "quantkit_report";
const MAX_LINES = 16; // the box grows with the text up to this many lines, then scrolls

app.registerExtension({
  name: "QuantKit.ShowText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name.startsWith("QuantKit")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text ?? []).join("\n");
      if (!text) return;
      let widget = this.widgets?.find((w) => w.name === WIDGET);
      if (!widget) {
        widget = ComfyWidgets.STRING(this, WIDGET, ["STRING", { multiline: true }], app).widget;
        widget.serialize = false; // never stored in the workflow's widget values
        widget.options.serialize = false; // nor sent as an input with the next prompt
        // Vue nodes draw the widget with their own <textarea> (not inputEl) and make it
        // read-only from this option (frontend 1.3x: readonly + disabled; 1.4x: readonly).
        widget.options.read_only = true;
        if (widget.inputEl) {
          widget.inputEl.readOnly = true;
          widget.inputEl.style.opacity = 0.85;
        }
      }
      widget.value = text;
      const lines = Math.min(text.split("\n").length + 1, MAX_LINES);
      // Classic canvas: the DOM widget is as tall as getMinHeight asks (and the node grows).
      widget.options.getMinHeight = () => lines * 14 + 12;
      // Vue nodes ignore getMinHeight and, in frontend 1.3x, node.setSize; their <textarea>
      // gets the widget's options as attributes, so `rows` gives it its natural height.
      // Rows count the lines as wrapped at the node's width (about 7.5 px a character).
      const columns = Math.max(20, Math.floor((this.size[0] - 40) / 7.5));
      const rows = text.split("\n").reduce((n, line) => n + Math.max(1, Math.ceil(line.length / columns)), 0);
      widget.options.rows = Math.min(rows + 1, MAX_LINES);
      this.setSize([this.size[0], Math.max(this.size[1], this.computeSize()[1])]); // grow downwards only
      app.graph.setDirtyCanvas(true, true);
    };
  },
});
