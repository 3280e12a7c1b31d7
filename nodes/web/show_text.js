// Shows the text a QuantKit node reports (ui.text) in a read-only box on the node.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const WIDGET = "quantkit_report";

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
        if (widget.inputEl) {
          widget.inputEl.readOnly = true;
          widget.inputEl.style.opacity = 0.85;
        }
      }
      widget.value = text;
      const lines = Math.min(text.split("\n").length + 1, 16);
      widget.options.getMinHeight = () => lines * 14 + 12;
      this.setSize([this.size[0], Math.max(this.size[1], this.computeSize()[1])]); // grow downwards only
      app.graph.setDirtyCanvas(true, true);
    };
  },
});
